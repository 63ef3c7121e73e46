"""Checkpoint loading/saving: official layouts, our safetensors format, and every bad-input error."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import GOLDEN_CONFIG, load_golden

import multiway
from multiway.model.checkpoints import CheckpointError
from multiway.model.multiway import interpolate_vision_positions


def golden_model(task="", **kw):
    sd, inputs, outputs = load_golden(task or "backbone")
    name = "beit3_base_patch16_224" + (f"_{task}" if task else "")
    return multiway.create_model(name, **{**GOLDEN_CONFIG, **kw}), sd, inputs, outputs


@pytest.mark.parametrize("wrapper", ["model", "module", None])
def test_official_pth_layouts_load(tmp_path, wrapper):
    model, sd, i, o = golden_model("vqav2", num_classes=20)
    path = tmp_path / "official.pth"
    torch.save({wrapper: sd, "epoch": 3} if wrapper else sd, path)
    report = multiway.load_checkpoint(model, path)
    assert len(report.loaded) == len(sd) and not report.missing
    with torch.no_grad():
        assert torch.allclose(model.eval()(i["image"], i["text_ids"], i["padding_mask"]), o["logits"], atol=1e-5)


def test_safetensors_round_trip_rebuilds_model_alone(tmp_path):
    model, sd, i, o = golden_model("captioning")
    multiway.load_checkpoint(model, sd)
    path = multiway.save_pretrained(model, tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind
    rebuilt = multiway.create_model(path).eval()
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    with torch.no_grad():
        logits, _ = rebuilt(i["image"], i["text_ids"], i["padding_mask"], i["language_masked_pos"])
    assert torch.allclose(logits, o["masked_logits"], atol=1e-5)


def test_head_kwargs_survive_round_trip(tmp_path):
    model = multiway.create_model("beit3_tiny_patch8_32_vqav2", num_classes=7)
    rebuilt = multiway.create_model(multiway.save_pretrained(model, tmp_path / "v.safetensors"))
    assert rebuilt.head[-1].out_features == 7 and rebuilt.config.normalize_output is False


def test_convert_cli(tmp_path):
    _, sd, _, _ = golden_model("retrieval")
    torch.save({"model": sd}, tmp_path / "r.pth")
    from multiway.cli import main

    overrides = [f"model_config.{k}={v}" for k, v in GOLDEN_CONFIG.items()]
    out = str(tmp_path / "r.safetensors")
    assert main(["convert", str(tmp_path / "r.pth"), out, "--model", "beit3_base_patch16_224_retrieval", *overrides]) == 0
    model = multiway.create_model(tmp_path / "r.safetensors")
    assert torch.equal(model.state_dict()["logit_scale"], sd["logit_scale"])


def test_prefix_is_added_or_stripped():
    _, sd, i, o = golden_model()
    bare = {k.removeprefix("beit3."): v for k, v in sd.items()}
    head_model = multiway.create_model("beit3_base_patch16_224_nlvr2", **GOLDEN_CONFIG)
    report = multiway.load_checkpoint(head_model, bare)  # backbone-only file into a task model
    assert set(report.missing) == {k for k in head_model.state_dict() if k.startswith("head.")}
    backbone = multiway.create_model("beit3_base_patch16_224", **GOLDEN_CONFIG).eval()
    task_sd, _, _ = load_golden("nlvr2")
    report = multiway.load_checkpoint(backbone, task_sd)  # task file into a bare backbone: head keys dropped
    assert not report.missing


def test_classification_ignores_final_layer_norm_and_new_head_is_reported():
    model, sd, _, _ = golden_model("imageclassification", num_classes=5)
    backbone_sd, _, _ = load_golden("backbone")
    assert any(".layer_norm.A" in k for k in backbone_sd)
    report = multiway.load_checkpoint(model, backbone_sd)
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert not report.unexpected


def test_head_with_other_shape_is_reset_and_reported():
    model, sd, _, _ = golden_model("vqav2", num_classes=30)
    before = model.head[3].weight.clone()
    report = multiway.load_checkpoint(model, sd)
    assert sorted(report.reset_heads) == ["head.3.bias", "head.3.weight"]
    assert torch.equal(model.head[3].weight, before)
    assert torch.equal(model.head[0].weight, sd["head.0.weight"])


def test_vision_positions_are_interpolated_to_a_new_image_size():
    model, sd, _, _ = golden_model("retrieval", img_size=48)
    report = multiway.load_checkpoint(model, sd)
    key = "beit3.encoder.embed_positions.A.weight"
    assert report.interpolated == [key]
    table = model.state_dict()[key]
    assert table.shape == (3 + 36, 64)
    assert torch.equal(table[:3], sd[key][:3])  # fairseq offset rows and CLS kept as they are
    same = interpolate_vision_positions(sd[key], 16)
    assert torch.equal(same, sd[key])
    # A constant grid stays constant under bicubic resizing.
    const = torch.cat([torch.zeros(3, 4), torch.ones(16, 4)])
    assert torch.allclose(interpolate_vision_positions(const, 64)[3:], torch.ones(64, 4), atol=1e-5)


def test_wrong_shapes_missing_and_unexpected_keys_are_listed():
    _, sd, _, _ = golden_model("nlvr2")
    wide = multiway.create_model("beit3_base_patch16_224_nlvr2", **{**GOLDEN_CONFIG, "embed_dim": 32})
    mismatch = r"mismatched shapes \(79\): .*embed_positions.B.weight: checkpoint \(64, 64\) vs model \(64, 32\)"
    with pytest.raises(CheckpointError, match=mismatch) as err:
        multiway.load_checkpoint(wide, sd)
    assert "missing" not in str(err.value)
    deep = multiway.create_model("beit3_base_patch16_224_nlvr2", **{**GOLDEN_CONFIG, "depth": 3})
    with pytest.raises(CheckpointError, match=r"missing backbone keys .*layers\.2\."):
        multiway.load_checkpoint(deep, sd)
    shallow = multiway.create_model("beit3_base_patch16_224_nlvr2", **{**GOLDEN_CONFIG, "depth": 1})
    with pytest.raises(CheckpointError, match=r"unexpected backbone keys .*layers\.1\."):
        multiway.load_checkpoint(shallow, sd)
    report = multiway.load_checkpoint(shallow, sd, strict=False)
    assert report.unexpected and report.loaded


def test_paper_variant_refuses_released_checkpoint():
    _, sd, _, _ = golden_model()
    paper = multiway.create_model("beit3_base_patch16_224", **GOLDEN_CONFIG, shared_attention=True)
    with pytest.raises(CheckpointError, match="shared_attention"):
        multiway.load_checkpoint(paper, sd)


def test_files_that_are_not_checkpoints(tmp_path):
    model = multiway.create_model("beit3_tiny_patch8_32")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth"):
        multiway.load_checkpoint(model, text)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        multiway.load_checkpoint(model, tmp_path / "missing.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        multiway.load_checkpoint(model, tmp_path / "odd.pth")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        multiway.load_checkpoint(model, bad_st)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.sentinel}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    _Exploit.sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _Exploit()}}, f)
    with pytest.raises(CheckpointError, match="execute code"):
        multiway.load_checkpoint(multiway.create_model("beit3_tiny_patch8_32"), path)
    assert not _Exploit.sentinel.exists()


def test_safetensors_without_config_needs_a_name(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no embedded multiway config"):
        multiway.create_model(tmp_path / "plain.safetensors")


def test_models_cli_lists_official_names():
    out = subprocess.run([sys.executable, "-m", "multiway.cli", "models"], capture_output=True, text=True, check=True).stdout.split()
    from multiway.model.factory import OFFICIAL_MODELS

    assert set(OFFICIAL_MODELS) <= set(out)
