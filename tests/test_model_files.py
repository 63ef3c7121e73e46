"""Hostile or broken model files: ``create_model(path)`` checks a file against its embedded config before it
allocates the model, and NaN/inf weights are loaded with a warning that names them."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import multiway
from multiway.model import factory
from multiway.model.checkpoints import CheckpointError, non_finite_tensors, read_safetensors_header

TINY = "beit3_tiny_patch8_32"


def tiny_file(tmp_path, task="vqav2", **head):
    model = multiway.create_model(f"{TINY}_{task}", **head)
    return multiway.save_pretrained(model, tmp_path / "model.safetensors"), model


def rewrite_metadata(path, **changes):
    """Rewrite the file with its tensors unchanged and the embedded config/head config changed."""
    state = load_file(str(path))
    _, metadata = read_safetensors_header(path)
    config = json.loads(metadata["multiway_config"])
    for key, value in changes.pop("config", {}).items():
        config[key] = value
    metadata["multiway_config"] = json.dumps(config)
    metadata.update(changes)
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.fixture
def builds(monkeypatch):
    """Records the default device of every model build, to show what was allocated before a refusal."""
    devices = []
    real = factory.build_model

    def recording(*args, **kwargs):
        devices.append(torch.empty(0).device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(factory, "build_model", recording)
    return devices


def test_header_is_read_without_tensors(tmp_path):
    path, model = tiny_file(tmp_path)
    shapes, metadata = read_safetensors_header(path)
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert metadata["model_name"] == "vqav2"


def test_config_claiming_far_more_layers_is_refused_before_any_build(tmp_path, builds):
    path = rewrite_metadata(tiny_file(tmp_path)[0], config={"depth": 1_000_000})
    builds.clear()  # the build that wrote the file
    with pytest.raises(CheckpointError, match=r"depth=1000000 but the file holds layers 0\.\.1 \(2 layers\)"):
        multiway.create_model(path)
    assert builds == []  # not even on the meta device: a million layers would take minutes to build there


def test_config_claiming_a_far_wider_model_is_refused_before_any_build(tmp_path, builds):
    path = rewrite_metadata(tiny_file(tmp_path)[0], config={"embed_dim": 1 << 20, "num_heads": 1 << 10, "ffn_dim": 1 << 22})
    builds.clear()  # the build that wrote the file
    with pytest.raises(CheckpointError, match=r"beit3\.text_embed\.weight is \(\d+, 64\) but its config says .* 1048576\)"):
        multiway.create_model(path)
    assert builds == []


def test_other_mismatches_are_found_on_the_meta_device_and_named(tmp_path, builds):
    path = rewrite_metadata(tiny_file(tmp_path)[0], config={"ffn_dim": 1 << 24})
    builds.clear()  # the build that wrote the file
    with pytest.raises(CheckpointError, match=r"mismatched shapes \(\d+\): beit3\.encoder\.layers\.0\.ffn\.A\.fc1\.weight: file \(256,"):
        multiway.create_model(path)
    assert builds == ["meta"]  # the 2 x 2 x 2 x 64 x 2^24 floats (4 GiB each) of the claim were never allocated


def test_head_config_that_does_not_fit_the_head_is_refused(tmp_path, builds):
    path = rewrite_metadata(tiny_file(tmp_path, num_classes=7)[0], head_config=json.dumps({"num_classes": 100_000}))
    builds.clear()  # the build that wrote the file
    with pytest.raises(CheckpointError, match=r"head\.3\.weight: file \(7, 128\) vs expected \(100000, 128\)"):
        multiway.create_model(path)
    assert builds == ["meta"]


def test_missing_and_extra_tensors_are_named(tmp_path):
    path, _ = tiny_file(tmp_path)
    state = load_file(str(path))
    _, metadata = read_safetensors_header(path)
    state.pop("pooler.dense.bias")
    state["stray.weight"] = torch.zeros(3)
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\): pooler\.dense\.bias.*unexpected keys \(1\): stray\.weight"):
        multiway.create_model(path)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"multiway_config": "{not json"}, "multiway_config/head_config is not valid"),
        ({"multiway_config": json.dumps({"depth": 2, "colour": "red"})}, "multiway_config/head_config is not valid"),
        ({"head_config": "[1, 2]"}, "head_config must be a JSON object"),
        ({"model_name": "segmentation"}, "model_name 'segmentation' is not a task"),
    ],
)
def test_broken_embedded_config_is_refused(tmp_path, changes, match):
    path, _ = tiny_file(tmp_path)
    state = load_file(str(path))
    _, metadata = read_safetensors_header(path)
    save_file(state, str(path), metadata={**metadata, **changes})
    with pytest.raises(CheckpointError, match=match):
        multiway.create_model(path)


def test_a_good_file_still_loads_with_overrides(tmp_path):
    path, model = tiny_file(tmp_path, num_classes=7)
    rebuilt = multiway.create_model(path, img_size=48)  # the vision position table is interpolated
    assert rebuilt.config.img_size == 48 and rebuilt.head[-1].out_features == 7
    assert torch.equal(rebuilt.state_dict()["head.3.weight"], model.state_dict()["head.3.weight"])


def test_non_finite_weights_are_loaded_with_a_warning_naming_them(tmp_path, caplog):
    model = multiway.create_model(f"{TINY}_vqav2", num_classes=7)
    state = model.state_dict()
    state["head.3.bias"][2] = float("nan")
    state["beit3.encoder.layers.1.ffn.B.fc2.weight"][0, 0] = float("-inf")
    target = multiway.create_model(f"{TINY}_vqav2", num_classes=7)
    with caplog.at_level(logging.WARNING, logger="multiway.model.checkpoints"):
        report = multiway.load_checkpoint(target, state)
    assert report.non_finite == ["beit3.encoder.layers.1.ffn.B.fc2.weight", "head.3.bias"]
    assert "NaN or inf" in caplog.text and "head.3.bias" in caplog.text and "layers.1.ffn.B.fc2.weight" in caplog.text
    assert "non_finite" in str(report)


def test_finite_weights_raise_no_warning(caplog):
    model = multiway.create_model(TINY)
    with caplog.at_level(logging.WARNING, logger="multiway.model.checkpoints"):
        report = multiway.load_checkpoint(multiway.create_model(TINY), model.state_dict())
    assert report.non_finite == [] and "NaN" not in caplog.text
    assert non_finite_tensors({"ids": torch.tensor([1, 2]), "w": torch.tensor([0.0, float("inf")])}) == ["w"]
