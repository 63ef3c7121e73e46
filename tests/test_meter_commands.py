"""METER from the documented commands: ``multiway finetune <task> model.preset=meter_...`` trains METER's class of the
task through the one loop and writes the usual run folder; ``evaluate``, ``predict`` and ``multiway.load`` take that
folder or its model file; ``--init`` takes a METER model file. Tiny METER on tiny built-in data."""

from __future__ import annotations

import json

import pytest
import torch

import multiway
from multiway import cli
from multiway.downstream.tasks import get_task

PRESET = "meter_tiny_vit_bert_coattn"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from multiway.data.shapes import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("builtin"), num_images=40, img_size=32, num_pairs=10, imagenet_per_class=4,
                                      progress=False)


def _finetune(task: str, data, out, *more: str, preset: str = PRESET) -> dict:
    argv = ["finetune", task, "--data-dir", str(data), "--tokenizer", str(data / "shapes.spm"), "--out-dir", str(out),
            f"model.preset={preset}", "train.max_steps=2", "batch_size=8", "max_text_len=24", "train.progress=false", *more]
    assert cli.main(argv) == 0
    return json.loads((out / "eval_val.json").read_text())


@pytest.fixture(scope="module")
def vqa_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "meter_vqa"
    torch.manual_seed(0)
    return out, _finetune("vqav2", data, out)


def test_finetune_trains_meter_and_writes_the_run_folder(vqa_run):
    out, metrics = vqa_run
    assert "vqa_score" in metrics
    meta = json.loads((out / "task.json").read_text())
    assert meta["task"] == "vqav2" and meta["family"] == "meter" and meta["model_task"] == "meter_vqa"
    assert (out / "metrics.csv").is_file() and any((out / "checkpoints").iterdir())
    model = get_task("vqav2", "meter").load_model(out / "model.safetensors")
    assert type(model).__name__ == "METERForVQA"


def test_evaluate_and_predict_take_the_meter_run(vqa_run, data, capsys):
    out, metrics = vqa_run
    assert cli.main(["evaluate", "--model", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics)  # the run's own evaluation, to the digit
    image = next((data / "images" / "val").iterdir())
    assert cli.main(["predict", "vqa", "--model", str(out), str(image), "--question", "what color is the square?", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    labels = json.loads((out / "task.json").read_text())["labels"]
    assert row["path"] == str(image) and row["answer"] in labels and len(row["top"]) == 3
    # a command the METER task does not offer is one error line naming what it offers
    assert cli.main(["predict", "caption", "--model", str(out), str(image)]) == 2
    assert "its predictions: vqa" in capsys.readouterr().err


def test_multiway_load_takes_a_meter_model_file(vqa_run, data):
    out, _ = vqa_run
    model, processor = multiway.load(out / "model.safetensors")
    assert type(model).__name__ == "METERForVQA" and processor.task.family == "meter" and processor.tokenizer is not None
    image = next((data / "images" / "val").iterdir())
    rows = processor.predict(images=[image], text="what color is the square?").rows
    assert rows[0]["answer"] in processor.labels


def test_init_from_a_meter_file_and_other_tasks(vqa_run, data, tmp_path):
    out, _ = vqa_run
    # a vanishing learning rate: the fine-tuned METER must still hold the init's weights
    metrics = _finetune("nlvr2", data, tmp_path / "nlvr2", f"model.init={out / 'model.safetensors'}", "train.lr=1e-12",
                        "train.min_lr=0", "train.warmup_steps=0")
    assert "nlvr2_acc" in metrics
    start = get_task("vqav2", "meter").load_model(out / "model.safetensors").state_dict()
    nlvr2 = get_task("nlvr2", "meter").load_model(tmp_path / "nlvr2" / "model.safetensors")
    assert type(nlvr2).__name__ == "METERForNLVR2"
    backbone = {k: v for k, v in nlvr2.state_dict().items() if k.startswith("meter.") and v.is_floating_point()}
    moved = [k for k, v in backbone.items() if not torch.allclose(v, start[k], atol=1e-6)]
    assert backbone and not moved, moved
    assert "average" in _finetune("coco_retrieval", data, tmp_path / "ret")


def test_meter_captioning_from_the_same_commands(data, tmp_path, capsys):
    out = tmp_path / "cap"
    assert "cider" in _finetune("coco_captioning", data, out, preset="meter_tiny_vit_bert_coattn_encdec")
    capsys.readouterr()
    images = sorted((data / "images" / "val").iterdir())[:2]
    assert cli.main(["predict", "caption", "--model", str(out), *map(str, images), "--max-len", "6", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == list(map(str, images)) and all(isinstance(r["caption"], str) for r in rows)
    assert cli.main(["predict", "caption", "--model", str(out), str(images[0]), "--num-beams", "3"]) == 2
    assert "decodes greedily" in capsys.readouterr().err
    model, processor = multiway.load(out)
    assert type(model).__name__ == "METERForCaptioning" and len(processor.predict(images=images, max_len=6).rows) == 2


def test_a_meter_preset_refuses_beit3_overrides_and_unknown_tasks(data, tmp_path, capsys):
    argv = ["finetune", "imagenet", "--data-dir", str(data), "--out-dir", str(tmp_path), f"model.preset={PRESET}", "train.max_steps=1"]
    assert cli.main(argv) == 2
    assert "unknown task 'imagenet' for meter models; valid tasks: vqav2, nlvr2" in capsys.readouterr().err
    argv = ["finetune", "vqav2", "--data-dir", str(data), "--tokenizer", str(data / "shapes.spm"), "--out-dir", str(tmp_path),
            f"model.preset={PRESET}", "model.drop_path_rate=0.1", "train.max_steps=1"]
    assert cli.main(argv) == 2
    assert "model.drop_path_rate: METER preset" in capsys.readouterr().err
