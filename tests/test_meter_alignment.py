"""METER's image-text contrastive (ITC) features depend on their inputs and align distinct pairs.

With [CLS] as the ITC feature, a tiny randomly initialised METER never linked images and captions: the image
[CLS] of a fresh ViT is the same vector for every image (cosine ~0.9999), the text [CLS] nearly so, and ITC on
them fell into the collapsed solution (loss exactly ln B, vanishing gradients) on the built-in data.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multiway.meter.config import tiny_config
from multiway.meter.model import METERModel
from multiway.meter.objectives import itc_logits, itc_loss

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_PAIRS, BATCH, LENGTH, VOCAB = 16, 8, 8, 60


def _pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NUM_PAIRS distinct pairs: a random 32-px image and a random caption each, padded after a random length.
    -> images (N, 3, 32, 32), ids (N, LENGTH), padding (N, LENGTH)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(NUM_PAIRS, 3, 4, 4, generator=g).repeat_interleave(8, -1).repeat_interleave(8, -2) * 2 - 1
    ids = torch.randint(4, VOCAB, (NUM_PAIRS, LENGTH), generator=g)
    ids[:, 0] = 0  # <s>
    lengths = torch.randint(5, LENGTH + 1, (NUM_PAIRS,), generator=g)
    padding = torch.arange(LENGTH)[None, :] >= lengths[:, None]
    ids[padding] = 1
    return images, ids, padding.long()


def _model(seed: int = 0) -> METERModel:
    cfg = tiny_config("vit", "bert", itm_hard_negatives=True)
    cfg.text.vocab_size = VOCAB
    torch.manual_seed(seed)
    return METERModel(cfg)


def _mean_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity between different rows of (N, D)."""
    x = F.normalize(x, dim=-1)
    n = x.shape[0]
    return float(((x @ x.t()).sum() - n) / (n * (n - 1)))


def test_itc_features_of_a_fresh_model_depend_on_the_input():
    m = _model()
    images, ids, pad = _pairs()
    with torch.no_grad():
        image_feature = m.dual_image_feature(m.encode_image_tokens(images))
        text_feature = m.dual_text_feature(m.encode_text_tokens(ids, pad), pad)
    assert _mean_cosine(image_feature) < 0.9, "ITC image features are nearly the same for every image"
    assert _mean_cosine(text_feature) < 0.9, "ITC text features are nearly the same for every caption"


def test_text_feature_ignores_padding():
    m = _model()
    tokens = torch.randn(2, 5, m.text.width)
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    changed = tokens.clone()
    changed[0, 3:] = 100.0
    torch.testing.assert_close(m.dual_text_feature(changed, pad), m.dual_text_feature(tokens, pad))
    torch.testing.assert_close(m.dual_text_feature(tokens, pad)[0], tokens[0, :3].mean(0))


def test_itc_aligns_distinct_pairs_below_ln_batch():
    """Random batches of 8 from 16 distinct pairs: ITC leaves ln 8 within 150 steps (with [CLS] it stayed at ln 8)."""
    m = _model()
    images, ids, pad = _pairs()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        pick = torch.randperm(NUM_PAIRS, generator=g)[:BATCH]
        logits = itc_logits(m, m.encode_text_tokens(ids[pick], pad[pick]), m.encode_image_tokens(images[pick]), pad[pick])
        loss = itc_loss(logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    late = sum(losses[-20:]) / 20
    assert late < math.log(BATCH) - 0.5, f"ITC stayed near ln {BATCH} = {math.log(BATCH):.3f}: last-20 mean {late:.3f}"


def _image_share_of_fused_text(m: METERModel) -> float:
    """How much the fused text tokens change when each caption is fused with another pair's image, relative to
    their norm (mean over tokens)."""
    images, ids, pad = _pairs()
    with torch.no_grad():
        text = m.encode_text_tokens(ids, pad)
        right = m.fuse(text, m.encode_image_tokens(images), pad).text
        other = m.fuse(text, m.encode_image_tokens(images.roll(1, 0)), pad).text
    return float(((right - other).norm(dim=-1) / right.norm(dim=-1)).mean())


def test_tiny_fusion_reads_the_image_at_init():
    """At width 32, METER's 0.02 init lets two post-LN fusion layers mix in almost nothing of the image (0.2% here);
    the tiny presets' width-scaled init (METER's per-layer gain) mixes in 30 times more from step 0."""
    from multiway.meter.config import width_scaled_init_std

    scaled = _model()
    assert scaled.config.init_std == pytest.approx(width_scaled_init_std(32)) == pytest.approx(0.02 * math.sqrt(24))
    cfg = scaled.config.replace(init_std=0.02)
    torch.manual_seed(0)
    narrow = METERModel(cfg)
    assert _image_share_of_fused_text(narrow) < 0.01
    assert _image_share_of_fused_text(scaled) > 0.05
    fusion_weights = [p for n, p in scaled.named_parameters() if n.startswith("fusion.") and n.endswith("q.weight")]
    assert float(torch.stack([w.detach().std() for w in fusion_weights]).mean()) == pytest.approx(scaled.config.init_std, rel=0.1)


def test_init_std_must_be_positive():
    with pytest.raises(ValueError, match="init_std"):
        tiny_config().replace(init_std=0.0)
