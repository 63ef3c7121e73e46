"""METER's released checkpoint layout loads into multiway.meter and gives the official code's numbers.

The fixtures (tests/fixtures/meter_reference/, made by tests/fixtures/make_meter_reference.py with the official
zdou0830/METER modules in a separate environment) are tiny random CLIP-ViT + RoBERTa and Swin + RoBERTa METERs
with every head, saved as Lightning-style ``.ckpt`` files, plus the official ``infer`` / ``compute_*`` outputs (CLIP
at 64 px and, through METER's own ``adapt_position_encoding``, at 80 px; Swin at 64 px).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from multiway.meter.checkpoints import (
    adapt_position_encoding,
    from_official,
    load_meter,
    load_official_checkpoint,
    meter_config_from_official,
    read_official,
    save_meter,
    swin_adapt_position_encoding,
)
from multiway.meter.model import METERForVQA, METERModel
from multiway.model.checkpoints import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

REF = Path(__file__).parent / "fixtures" / "meter_reference"
CKPT = REF / "clip_roberta.ckpt"
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REF / "outputs.pt", weights_only=True)


def _inputs(ref: dict, size: str):
    b = ref[size]["batch"]
    return b["image"][0], b["false_image_0"][0], b["text_ids"], (b["text_masks"] == 0).long(), b


@pytest.mark.parametrize("size", ["64", "80"])
def test_infer_and_every_head_match_the_official_code(reference, size):
    img, img2, ids, pad, batch = _inputs(reference, size)
    want = reference[size]["outputs"]
    image_size = int(size)
    with torch.no_grad():
        pre = from_official(CKPT, "pretraining", image_size=image_size).eval()
        m = pre.meter
        out = m.encode(img, ids, pad)
        torch.testing.assert_close(out.text, want["infer.text_feats"], **TOL)
        torch.testing.assert_close(out.image, want["infer.image_feats"], **TOL)
        torch.testing.assert_close(m.features(out), want["infer.cls_feats"], **TOL)
        mlm = pre.mlm_head(m.encode(img, batch["text_ids_mlm"], pad).text)
        torch.testing.assert_close(mlm, want["mlm_logits"], **TOL)
        chosen = torch.where(want["itm_labels"].bool()[:, None, None, None], img, img2)
        torch.testing.assert_close(pre.itm_head(m.features(m.encode(chosen, ids, pad))), want["itm_logits"], **TOL)

        vqa = from_official(CKPT, "vqa", image_size=image_size).eval()
        assert vqa.head[-1].out_features == 11
        torch.testing.assert_close(vqa(img, ids, pad), want["vqa_logits"], **TOL)
        nlvr2, snli, ret = (from_official(CKPT, t, image_size=image_size).eval() for t in ("nlvr2", "snli_ve", "retrieval"))
        torch.testing.assert_close(nlvr2(img, img2, ids, pad), want["nlvr2_logits"], **TOL)
        torch.testing.assert_close(snli(img, ids, pad), want["snli_logits"], **TOL)
        torch.testing.assert_close(ret(img, ids, pad), want["rank_scores"], **TOL)


@pytest.mark.parametrize("ckpt, outputs", [("swin_roberta.ckpt", "outputs_swin.pt"), ("clip_bert.ckpt", "outputs_bert.pt")])
def test_swin_and_bert_checkpoints_match_the_official_code(ckpt, outputs):
    """METER's own Swin module (original key layout, downsampling at the end of a stage, fused-mean image pooling),
    and BERT as the text encoder (two token-type rows, unshifted positions)."""
    ref = torch.load(REF / outputs, weights_only=True)
    b, want = ref["batch"], ref["outputs"]
    img, img2, ids, pad = b["image"][0], b["false_image_0"][0], b["text_ids"], (b["text_masks"] == 0).long()
    path = REF / ckpt
    with torch.no_grad():
        pre = from_official(path, "pretraining").eval()
        swin = ckpt.startswith("swin")
        assert (pre.meter.config.image_pooling == "fused_mean") == swin and pre.meter.num_image_prefix == (0 if swin else 1)
        assert pre.meter.config.text.name == ("roberta" if swin else "bert")
        out = pre.meter.encode(img, ids, pad)
        torch.testing.assert_close(out.text, want["infer.text_feats"], **TOL)
        torch.testing.assert_close(out.image, want["infer.image_feats"], **TOL)
        torch.testing.assert_close(pre.meter.features(out), want["infer.cls_feats"], **TOL)
        torch.testing.assert_close(pre.mlm_head(pre.meter.encode(img, b["text_ids_mlm"], pad).text), want["mlm_logits"], **TOL)
        torch.testing.assert_close(from_official(path, "vqa").eval()(img, ids, pad), want["vqa_logits"], **TOL)
        torch.testing.assert_close(from_official(path, "nlvr2").eval()(img, img2, ids, pad), want["nlvr2_logits"], **TOL)
        torch.testing.assert_close(from_official(path, "retrieval").eval()(img, ids, pad), want["rank_scores"], **TOL)


def test_config_read_from_the_checkpoint():
    state, hparams = read_official(CKPT)
    cfg = meter_config_from_official(state, hparams)
    assert (cfg.vision.img_size, cfg.vision.kwargs["depth"], cfg.vision.kwargs["embed_dim"]) == (64, 2, 128)
    assert (cfg.text.name, cfg.text.vocab_size, cfg.fusion.depth, cfg.fusion.width, cfg.fusion.num_heads) == ("roberta", 300, 2, 64, 2)
    assert cfg.dual_encoder is False and cfg.fusion.layer_norm_eps == 1e-12


def test_position_adaptation_follows_meter():
    """Class row kept, grid resized bicubically without antialiasing; Swin tables per 32-px grid; buffers dropped."""
    table = torch.randn(1 + 9, 4)
    out = adapt_position_encoding({"vit_model.visual.positional_embedding": table.clone()}, after=80, patch_size=16)
    new = out["vit_model.visual.positional_embedding"]
    assert new.shape == (26, 4) and torch.equal(new[0], table[0])
    grid = torch.nn.functional.interpolate(table[1:].reshape(3, 3, 4).permute(2, 0, 1)[None], size=(5, 5), mode="bicubic")
    torch.testing.assert_close(new[1:], grid[0].permute(1, 2, 0).reshape(25, 4))
    swin = {"a.relative_position_bias_table": torch.randn(23 * 23, 3), "a.relative_position_index": torch.zeros(1)}
    swin["a.attn_mask"] = torch.zeros(1)
    swin = swin_adapt_position_encoding(swin, before=384, after=576)
    assert swin["a.relative_position_bias_table"].shape == (35 * 35, 3) and set(swin) == {"a.relative_position_bias_table"}
    with pytest.raises(ValueError, match="multiple of the patch size"):
        adapt_position_encoding({"visual.positional_embedding": table}, after=70, patch_size=16)


def test_unknown_and_missing_keys_are_named():
    state, hparams = read_official(CKPT)
    cfg = meter_config_from_official(state, hparams)
    model = METERForVQA(METERModel(cfg), num_labels=11)
    bad = dict(state)
    bad["cross_modal_text_layers.0.bogus.weight"] = torch.zeros(1)
    del bad["cross_modal_image_pooler.dense.weight"]
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*image_pooler\.0\.weight.*unexpected keys.*bogus"):
        load_official_checkpoint(model, bad)
    # other tasks' heads are ignored, a new answer vocabulary re-initialises the head
    report = load_official_checkpoint(METERForVQA(METERModel(cfg), num_labels=5), state)
    assert "head.3.weight" in report.reset_heads and "nlvr2_classifier.0.weight" in report.unexpected


def test_lightning_file_read_weights_only(tmp_path):
    import argparse

    path = tmp_path / "evil.ckpt"  # an object outside tensors and plain containers: its class would be imported
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_official(path)


def test_convert_cli_and_our_file_round_trip(tmp_path, reference):
    from multiway.cli import main

    out = tmp_path / "vqa.safetensors"
    assert main(["meter", "convert", str(CKPT), str(out), "--task", "vqa"]) == 0
    model = load_meter(out).eval()
    img, _, ids, pad, _ = _inputs(reference, "64")
    with torch.no_grad():
        torch.testing.assert_close(model(img, ids, pad), reference["64"]["outputs"]["vqa_logits"], **TOL)
    save_meter(model, tmp_path / "again.safetensors")
    assert type(load_meter(tmp_path / "again.safetensors")) is METERForVQA
