"""METER components: every encoder/fusion/architecture builds and runs; masks; local weights; config errors."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from multiway.meter.config import FusionConfig, MeterConfig, TextEncoderConfig, VisionEncoderConfig, get_meter_config, tiny_config
from multiway.meter.encoders import TextEncoder, VisionEncoder
from multiway.meter.model import METERForCaptioning, METERForNLVR2, METERForRetrieval, METERForVQA, METERModel

# Tiny METER models run fastest on one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(B=2, T=10, V=900):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (B, T), generator=g)
    ids[:, 0] = 0
    pad = torch.zeros(B, T, dtype=torch.long)
    pad[-1, 6:] = 1
    ids[-1, 6:] = 1
    return torch.randn(B, 3, 32, 32, generator=g), ids, pad


@pytest.mark.parametrize("vision", ["vit", "swin", "multiway"])
@pytest.mark.parametrize("text", ["bert", "roberta", "embedding"])
def test_every_encoder_pair_runs(vision, text):
    model = METERForVQA(tiny_config(vision, text), num_labels=7).eval()
    img, ids, pad = _batch()
    out = model.meter.encode(img, ids, pad)
    assert out.text.shape == (2, 10, 32)
    assert out.image.shape == (2, 1 + model.meter.vision.grid ** 2, 32)
    logits = model(img, ids, pad)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("vision", ["vit", "swin", "multiway"])
def test_tiny_config_width(vision):
    """``width`` scales the encoders, the fusion and the new layers' init together; the default is the width-32 model."""
    from multiway.meter.config import width_scaled_init_std

    wide = tiny_config(vision, "bert", width=64)
    model = METERModel(wide).eval()
    img, ids, pad = _batch()
    out = model.encode(img, ids, pad)
    assert out.text.shape == (2, 10, 64) and model.text.width == 64 and wide.fusion.ffn_dim == 128
    assert wide.vision.kwargs["embed_dim"] == (32 if vision == "swin" else 64)  # Swin's last stage doubles its first
    assert wide.init_std == pytest.approx(width_scaled_init_std(64)) and wide.init_std < tiny_config(vision).init_std
    narrow = tiny_config(vision)
    assert narrow.fusion.width == 32 and narrow.text.kwargs["hidden_size"] == 32
    assert narrow.vision.kwargs["embed_dim"] == (16 if vision == "swin" else 32)
    with pytest.raises(ValueError, match="width=30: expected a multiple of 4"):
        tiny_config(vision, width=30)


@pytest.mark.parametrize("fusion", ["co_attention", "merged_attention"])
@pytest.mark.parametrize("arch", ["encoder_only", "encoder_decoder"])
def test_fusion_architecture_heads(fusion, arch):
    cfg = tiny_config("vit", "bert", fusion, arch)
    meter = METERModel(cfg).eval()
    img, ids, pad = _batch()
    assert meter.features(meter.encode(img, ids, pad)).shape == (2, meter.feature_dim)
    assert meter.feature_dim == (32 if arch == "encoder_decoder" else 64)
    assert METERForNLVR2(meter)(img, img.flip(0), ids, pad).shape == (2, 2)
    assert METERForRetrieval(meter)(img, ids, pad).shape == (2,)
    if arch == "encoder_decoder":
        cap = METERForCaptioning(meter)
        assert cap(img, ids, pad).shape == (2, 10, meter.vocab_size)
        gen = cap.generate(img, max_len=5)
        assert gen.shape[0] == 2 and gen.shape[1] <= 5
        assert (gen < meter.sentinel_start).all()  # sentinels never generated
    else:
        with pytest.raises(ValueError, match="architecture='encoder_decoder'"):
            METERForCaptioning(meter)


@pytest.mark.parametrize("fusion", ["co_attention", "merged_attention"])
def test_padding_does_not_change_outputs(fusion):
    """Extra padding tokens are invisible: features of a sample equal those with more pads appended."""
    meter = METERModel(tiny_config("vit", "bert", fusion, "encoder_decoder")).eval()
    img, ids, pad = _batch(B=1)
    ids2 = torch.cat([ids, torch.ones(1, 5, dtype=torch.long)], 1)
    pad2 = torch.cat([pad, torch.ones(1, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        a = meter.encode(img, ids, pad)
        b = meter.encode(img, ids2, pad2)
        torch.testing.assert_close(a.image, b.image, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.text, b.text[:, :10], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(meter.features(a), meter.features(b), atol=1e-5, rtol=1e-4)


def test_timm_weights_from_local_file_with_resolution_change(tmp_path):
    from safetensors.torch import save_file

    src = VisionEncoder(tiny_config("vit").vision)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    cfg = tiny_config("vit").vision
    cfg.img_size, cfg.weights = 48, str(path)
    enc = VisionEncoder(cfg)
    assert enc.grid == 6 and enc.model.pos_embed.shape[1] == 1 + 36
    torch.testing.assert_close(enc.model.patch_embed.proj.weight, src.model.patch_embed.proj.weight)
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)


def test_hf_text_encoder_from_local_dir(tmp_path):
    from transformers import BertConfig, BertModel

    bert_config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    src = BertModel(bert_config, add_pooling_layer=False)
    src.save_pretrained(tmp_path / "bert")
    enc = TextEncoder(TextEncoderConfig("hf", "bert", pretrained=str(tmp_path / "bert"), vocab_size=100), extra_tokens=8)
    assert enc.width == 32 and enc.vocab_size == 108
    assert enc.word_embeddings.num_embeddings == 108  # resized for T5 sentinels
    torch.testing.assert_close(enc.word_embeddings.weight[:100], src.get_input_embeddings().weight)
    torch.testing.assert_close(enc.model.encoder.layer[0].output.dense.weight, src.encoder.layer[0].output.dense.weight)


def test_config_round_trip_and_presets(tmp_path):
    cfg = get_meter_config("meter_tiny_swin_roberta_coattn", **{"fusion.kind": "merged_attention", "objectives.mim": True})
    cfg.save(tmp_path / "m.yaml")
    back = MeterConfig.load(tmp_path / "m.yaml")
    assert back.fusion.kind == "merged_attention" and back.objectives.mim and back.vision.name.startswith("swin")
    paper = get_meter_config("meter_clip16_roberta_coattn")
    assert (paper.fusion.depth, paper.fusion.width, paper.fusion.num_heads) == (6, 768, 12)


# --- bad configs: clear errors naming the option and the accepted values --------------------------------------


def test_unknown_vision_encoder():
    with pytest.raises(ValueError, match=r"vision\.name='vit_bogus_patch16'.*accepted values"):
        VisionEncoder(VisionEncoderConfig("timm", "vit_bogus_patch16", img_size=32))
    with pytest.raises(ValueError, match=r"vision\.name='beit3_nope'.*accepted values.*beit3_tiny_patch8_32"):
        VisionEncoder(VisionEncoderConfig("multiway", "beit3_nope", img_size=32))
    with pytest.raises(ValueError, match=r"vision\.kind='clip'.*accepted values: 'timm', 'multiway'"):
        VisionEncoderConfig("clip")


def test_unknown_text_encoder():
    with pytest.raises(ValueError, match=r"text\.name='gpt9'.*accepted values: bert, roberta"):
        TextEncoder(TextEncoderConfig("hf", "gpt9", vocab_size=50))
    with pytest.raises(ValueError, match=r"text\.kind='lstm'.*accepted values: 'hf', 'embedding'"):
        TextEncoderConfig("lstm")


def test_fusion_width_mismatch_and_unknown_kinds():
    with pytest.raises(ValueError, match=r"fusion\.width=30 is not divisible by fusion\.num_heads=4"):
        FusionConfig(width=30, num_heads=4)
    with pytest.raises(ValueError, match=r"fusion\.kind='cross'.*accepted values: 'co_attention', 'merged_attention'"):
        FusionConfig(kind="cross")
    with pytest.raises(ValueError, match=r"architecture='decoder_only'.*accepted values"):
        tiny_config(architecture="decoder_only")
    with pytest.raises(ValueError, match=r"decoder\.num_heads"):
        MeterConfig(fusion=FusionConfig(width=36, num_heads=4), decoder={"num_heads": 8})
    with pytest.raises(ValueError, match=r"unknown key 'fusion\.widht'; valid keys of fusion: .*'width'"):
        MeterConfig(fusion={"widht": 32})


def test_missing_local_weights(tmp_path):
    cfg = tiny_config("vit").vision
    cfg.weights = str(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match=r"vision\.weights=.*absent\.safetensors.*never downloads"):
        VisionEncoder(cfg)
    with pytest.raises(FileNotFoundError, match=r"text\.pretrained=.*no_such_dir"):
        TextEncoder(TextEncoderConfig("hf", "bert", pretrained=str(tmp_path / "no_such_dir")))
    mw = tiny_config("multiway").vision
    mw.weights = str(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match=r"vision\.weights="):
        VisionEncoder(mw)


def test_nlvr2_second_image_type_starts_from_the_first():
    """As METER's NLVR2 fine-tuning: the second image's type embedding (untrained in pre-training) := the first's."""
    meter = METERModel(tiny_config("vit", "bert"))
    with torch.no_grad():
        meter.type_embed.weight[1] += 1.0  # as if pre-trained
    first, text = meter.type_embed.weight[1].clone(), meter.type_embed.weight[0].clone()
    nlvr2 = METERForNLVR2(meter)
    rows = nlvr2.meter.type_embed.weight
    assert torch.equal(rows[2], first) and torch.equal(rows[1], first) and torch.equal(rows[0], text)
