"""The dense tasks on the task interface: fine-tune + evaluate on the built-in data, chance levels, predict on a folder."""

from __future__ import annotations

import json

import pytest
import torch

from multiway.config import from_dict
from multiway.downstream.finetune import FinetuneConfig, finetune
from multiway.downstream.inference import load_predictor
from multiway.downstream.tasks import DataSettings, get_task

TINY = {
    "coco_detection": {"out_channels": 16, "box_head_width": 32, "box_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 50,
                       "rpn_post_nms_top_n_test": 50, "jitter_min": 0.5, "jitter_max": 1.5},
    "coco_instance_segmentation": {"out_channels": 16, "box_head_width": 32, "mask_head_width": 8, "box_batch_size_per_image": 32,
                                   "rpn_post_nms_top_n_train": 50, "rpn_post_nms_top_n_test": 50},
    "ade20k": {"channels": 16, "aux_channels": 8},
    "conll": {},
}


@pytest.fixture(scope="module")
def shapes_dir(dense_shapes_data):
    return dense_shapes_data(64)


def _finetune(task: str, shapes_dir, out_dir, steps: int = 2) -> dict[str, float]:
    cfg = {"task": task, "data_dir": str(shapes_dir), "out_dir": str(out_dir), "tokenizer": str(shapes_dir / "shapes.spm"),
           "model": {"preset": "beit3_tiny_patch8_32"}, "batch_size": 4, "eval_split": "test", "max_text_len": 24,
           "options": TINY[task], "train": {"max_steps": steps, "lr": 1e-3, "warmup_steps": 0, "log_every": 1, "save_every": 0}}
    return finetune(from_dict(FinetuneConfig, cfg), progress=False)


@pytest.mark.parametrize("task, metric", [("coco_instance_segmentation", "mask_AP"), ("ade20k", "mIoU"), ("conll", "f1")])
def test_finetune_evaluate_and_chance(task, metric, shapes_dir, tmp_path):
    torch.manual_seed(0)
    result = _finetune(task, shapes_dir, tmp_path / task)
    assert metric in result and 0.0 <= result[metric] <= 100.0
    assert json.loads((tmp_path / task / "eval_test.json").read_text())[metric] == result[metric]
    cls = get_task(task)
    instance = cls(TINY[task])
    from multiway.tokenizers.text import TextTokenizer

    data = DataSettings(str(shapes_dir), tokenizer=TextTokenizer(shapes_dir / "shapes.spm"), max_text_len=24, img_size=32)
    chance = instance.chance_level(instance.build_dataset("train", data), instance.build_dataset("test", data))
    assert 0.0 <= chance < 60.0


def test_chance_levels_are_what_they_say(shapes_dir):
    data = DataSettings(str(shapes_dir), img_size=32)
    seg = get_task("ade20k")()
    train, test = seg.build_dataset("train", data), seg.build_dataset("test", data)
    assert seg.num_classes(train) == 7  # background + six shape kinds after reduce_zero_label
    # background everywhere: IoU = the background's pixel share for it, 0 for every shape class the test labels hold
    import numpy as np

    labels = np.concatenate([test.base.read_label(p).ravel() for _, p in test.base.pairs])
    labels = labels[labels != 255]
    expected = 100 * (labels == 0).mean() / len(np.unique(labels))
    assert seg.chance_level(train, test) == pytest.approx(expected)
    det = get_task("coco_detection")()
    assert det.chance_level(det.build_dataset("train", data), det.build_dataset("test", data)) < 10.0


def _folder_with_a_broken_image(shapes_dir, tmp_path):
    import shutil

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("000000.png", "000001.png"):
        shutil.copy(shapes_dir / "images" / "train" / name, folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


@pytest.mark.parametrize("task, command", [("coco_instance_segmentation", "detect"), ("ade20k", "segment")])
def test_predict_on_a_folder_reports_broken_images(task, command, shapes_dir, tmp_path):
    run = tmp_path / "run"
    _finetune(task, shapes_dir, run, steps=1)
    pred = load_predictor(run)
    folder = _folder_with_a_broken_image(shapes_dir, tmp_path)
    module = __import__(type(pred.downstream).__module__, fromlist=[command])
    if command == "detect":
        result = module.detect(pred, [str(folder)], str(tmp_path / "out"), threshold=0.0)
    else:
        result = module.segment(pred, [str(folder)], str(tmp_path / "out"))
    assert len(result.rows) == 2 and len(result.errors) == 1 and "broken.png" in result.errors[0]
    assert sorted(p.name for p in (tmp_path / "out" / "pictures").iterdir()) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["000000.png", "000001.png"]
    assert len(json.loads((tmp_path / "out" / "predictions.json").read_text())) >= (0 if command == "detect" else 2)
    assert any(c.name == command for c in type(pred.downstream).predict_commands)
