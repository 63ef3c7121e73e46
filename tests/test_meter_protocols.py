"""METER's retrieval protocol (every pair re-scored by the fusion) and encoder-decoder decoding on a KV cache."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from multiway.meter.config import tiny_config
from multiway.meter.generation import beam_search, generate, greedy_search
from multiway.meter.model import METERForRetrieval, METERModel
from multiway.meter.retrieval import compute_irtr_recall, recall_from_scores, rescore_all

pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 900, (n, 8), generator=g)
    ids[:, 0] = 0
    pad = torch.zeros(n, 8, dtype=torch.long)
    for i in range(n):
        cut = 3 + i % 5
        ids[i, cut:], pad[i, cut:] = 1, 1
    return ids, pad


def test_rescore_all_equals_brute_force_and_recall_matches_a_direct_count():
    torch.manual_seed(7)
    model = METERForRetrieval(tiny_config("vit", "bert")).eval()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    ids, pad = _texts(7, 9)
    scores = rescore_all(model, images, ids, pad, image_chunk=2, text_chunk=3, encode_batch=4)  # chunks that do not divide
    with torch.no_grad():
        brute = torch.tensor([[model(images[i : i + 1], ids[t : t + 1], pad[t : t + 1]).item() for t in range(7)] for i in range(5)])
    torch.testing.assert_close(scores, brute, atol=1e-5, rtol=1e-4)

    image_ids = torch.tensor([10, 11, 12, 13, 14])
    text_image_ids = torch.tensor([10, 10, 11, 12, 13, 14, 14])
    rec = recall_from_scores(brute, image_ids, text_image_ids, ks=(1, 2))
    for k in (1, 2):
        ir = sum(text_image_ids[t] in image_ids[brute[:, t].topk(k).indices] for t in range(7)) / 7
        tr = sum(bool((text_image_ids[brute[i].topk(k).indices] == image_ids[i]).any()) for i in range(5)) / 5
        assert rec[f"ir_r@{k}"] == pytest.approx(100 * ir) and rec[f"tr_r@{k}"] == pytest.approx(100 * tr)
    full = compute_irtr_recall(model, images, image_ids, ids, pad, text_image_ids, image_chunk=3, text_chunk=2)
    assert full["average"] == pytest.approx(recall_from_scores(scores, image_ids, text_image_ids)["average"])
    with pytest.raises(ValueError, match="image_chunk must be >= 1"):
        rescore_all(model, images, ids, pad, image_chunk=0)


def test_meter_checkpoint_models_rescore_without_dual_projections():
    cfg = tiny_config("vit", "bert")
    cfg.dual_encoder = False
    model = METERForRetrieval(cfg).eval()
    assert not hasattr(model.meter, "itc_text")
    ids, pad = _texts(3, 1)
    assert rescore_all(model, torch.randn(2, 3, 32, 32), ids, pad).shape == (2, 3)
    with pytest.raises(ValueError, match="no dual-encoder projections"):
        model.meter.dual_embed_text(torch.zeros(1, 3, 32))


@pytest.fixture(scope="module", params=[False, True], ids=["post_ln", "pre_ln"])
def captioner(request) -> METERModel:
    torch.manual_seed(11)
    cfg = tiny_config("vit", "bert", "co_attention", "encoder_decoder")
    cfg.decoder.depth = 2
    cfg.fusion.norm_first = request.param
    meter = METERModel(cfg).eval()
    with torch.no_grad():  # a peaked LM head, so that </s> and repeated words both occur
        meter.decoder.lm_head.weight.mul_(40)
    return meter


def test_decoder_step_equals_full_forward(captioner):
    m = captioner
    out = m.encode(torch.randn(2, 3, 32, 32), torch.tensor([[0, 2], [0, 2]]))
    mem, pad = m.memory(out)
    ids = torch.randint(3, 900, (2, 6))
    with torch.no_grad():
        full = m.decoder(ids, mem, pad)
        cache = m.decoder.new_cache()
        steps = torch.cat([m.decoder.step(ids[:, t : t + 1], t, mem, pad, cache) for t in range(6)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)


def test_cached_equals_uncached_and_beam_one_equals_greedy(captioner):
    image = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    g_cached, g_plain = greedy_search(captioner, image, max_len=9), greedy_search(captioner, image, max_len=9, use_cache=False)
    assert torch.equal(g_cached.sequences, g_plain.sequences)
    torch.testing.assert_close(g_cached.scores, g_plain.scores)
    b_cached = beam_search(captioner, image, num_beams=3, max_len=9)
    b_plain = beam_search(captioner, image, num_beams=3, max_len=9, use_cache=False)
    assert torch.equal(b_cached.sequences, b_plain.sequences)
    torch.testing.assert_close(b_cached.scores, b_plain.scores)
    b1 = beam_search(captioner, image, num_beams=1, max_len=9, early_stopping=True)
    assert torch.equal(b1.sequences, g_cached.sequences)
    torch.testing.assert_close(b1.scores, g_cached.scores)
    assert torch.equal(generate(captioner, image, num_beams=1, max_len=9).sequences, g_cached.sequences)


def test_beam_scores_are_the_length_normalised_log_probability(captioner):
    """Every returned hypothesis: <s> ... </s>, and its score re-computed by teacher forcing."""
    m = captioner
    image = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    res = beam_search(m, image, num_beams=3, max_len=8, length_penalty=0.6)
    mem, pad = m.memory(m.encode(image, torch.tensor([[m.bos_id, m.eos_id]]).expand(3, -1)))
    with torch.no_grad():
        for b in range(3):
            seq = res.sequences[b]
            n = int((seq != m.pad_id).sum())
            assert seq[0] == m.bos_id and seq[n - 1] == m.eos_id
            logits = m.decoder.lm_head(m.decoder(seq[None, : n - 1], mem[b : b + 1], pad[b : b + 1] if pad is not None else None))[0]
            logits[:, m.sentinel_start :] = float("-inf")
            logits[:, m.pad_id] = float("-inf")
            logp = logits.float().log_softmax(-1)
            # the last position closes with </s> in place of its best word
            words = [int(seq[t + 1]) if t + 1 < n - 1 or n < 8 else int(logp[t].argmax()) for t in range(n - 1)]
            total = sum(logp[t, w].item() for t, w in enumerate(words))
            assert res.scores[b].item() == pytest.approx(total / n**0.6, abs=1e-4)
    gen = m.generate(image, max_len=7)
    assert gen.shape[0] == 3 and gen.shape[1] <= 7 and (gen < m.sentinel_start).all()
