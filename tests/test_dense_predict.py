"""Dense prediction through ``multiway predict detect | segment | tag``, pretrained weights reaching the dense
models, and the options that size the dense tasks for small images (quickstart)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from multiway import cli
from multiway.config import from_dict
from multiway.downstream.finetune import FinetuneConfig, finetune
from multiway.downstream.tasks import DataSettings, get_task

TINY = {
    "coco_instance_segmentation": {"out_channels": 16, "box_head_width": 32, "mask_head_width": 8, "box_batch_size_per_image": 32,
                                   "rpn_post_nms_top_n_train": 50, "rpn_post_nms_top_n_test": 50, "input_size": 64},
    "ade20k": {"channels": 16, "aux_channels": 8, "input_scale": 2.0},
    "conll": {},
}


@pytest.fixture(scope="module")
def shapes_dir(dense_shapes_data):
    return dense_shapes_data(32)


def _finetune(task: str, shapes_dir, out_dir, init: str | None = None, steps: int = 1, options: dict | None = None) -> dict:
    cfg = {"task": task, "data_dir": str(shapes_dir), "out_dir": str(out_dir), "tokenizer": str(shapes_dir / "shapes.spm"),
           "model": {"preset": "beit3_tiny_patch8_32", "init": init}, "batch_size": 4, "eval_split": "test", "max_text_len": 24,
           "options": {**TINY[task], **(options or {})},
           "train": {"max_steps": steps, "lr": 1e-3, "warmup_steps": 0, "log_every": 1, "save_every": 0}}
    return finetune(from_dict(FinetuneConfig, cfg), progress=False)


@pytest.fixture(scope="module")
def runs(shapes_dir, tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("runs")
    for task in TINY:
        _finetune(task, shapes_dir, root / task)
    return root


@pytest.fixture()
def photos(shapes_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, source in enumerate(sorted((shapes_dir / "images" / "test").iterdir())[:2]):
        shutil.copy(source, folder / f"00000{index}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def _predict(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = cli.main(["predict", *argv, "--json"])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")], captured.err


def test_cli_detect_on_a_folder_with_a_broken_image(runs, photos, tmp_path, capsys):
    out = tmp_path / "det"
    code, rows, err = _predict(capsys, "detect", "--model", str(runs / "coco_instance_segmentation"), str(photos), "--out", str(out),
                               "--threshold", "0")
    assert code == 0 and "broken.png" in err
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == ["000000.png", "000001.png"]
    entries = json.loads((out / "predictions.json").read_text())
    assert entries and all(set(e) >= {"file_name", "category", "score", "bbox"} and len(e["bbox"]) == 4 for e in entries)
    assert {e["file_name"].rsplit("/", 1)[-1] for e in entries} <= {"000000.png", "000001.png"}
    for name in ("000000.png", "000001.png"):
        mask = np.asarray(Image.open(out / "masks" / name))
        assert mask.shape == (32, 32) and mask.max() <= len(entries)  # instance ids at the image's size
        assert Image.open(out / "pictures" / name).size == (32, 32)
    assert not (out / "masks" / "broken.png").exists()


def test_cli_segment_on_a_folder_with_a_broken_image(runs, photos, tmp_path, capsys):
    out = tmp_path / "seg"
    code, rows, err = _predict(capsys, "segment", "--model", str(runs / "ade20k"), str(photos), "--out", str(out))
    assert code == 0 and "broken.png" in err and len(rows) == 2
    entries = json.loads((out / "predictions.json").read_text())
    assert len(entries) == 2 and all(abs(sum(e["classes"].values()) - 1.0) < 1e-3 for e in entries)
    for name in ("000000.png", "000001.png"):
        classes = np.asarray(Image.open(out / "masks" / name))
        assert classes.shape == (32, 32) and classes.max() < 7  # background + six shape kinds
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["000000.png", "000001.png"]


def test_cli_tag_sentences(runs, tmp_path, capsys):
    texts = tmp_path / "sentences.txt"
    texts.write_text("a big red circle on the left\n\nthe blue star is above the green square\n")
    code, rows, _ = _predict(capsys, "tag", "--model", str(runs / "conll"), str(texts))
    assert code == 0 and [r["text"] for r in rows] == ["a big red circle on the left", "the blue star is above the green square"]
    tags = {"O", "B-COLOUR", "B-SHAPE"}
    for row in rows:
        assert [w for w, _ in row["tags"]] == row["text"].split() and {t for _, t in row["tags"]} <= tags
        assert all(kind in ("COLOUR", "SHAPE") for kind, _ in row["entities"])


def test_tag_sentences_reads_entities_from_the_tags(runs):
    from multiway.downstream.inference import load_predictor
    from multiway.downstream.tasks.conll import tag_sentences

    pred = load_predictor(runs / "conll")
    with torch.no_grad():  # a classifier that says B-COLOUR for every word, whatever the encoder gives
        pred.model.classifier.weight.zero_()
        pred.model.classifier.bias.copy_(torch.tensor([1.0 if t == "B-COLOUR" else 0.0 for t in pred.labels]))
    row = tag_sentences(pred, ["a red circle"]).rows[0]
    assert row["tags"] == [["a", "B-COLOUR"], ["red", "B-COLOUR"], ["circle", "B-COLOUR"]]
    assert row["entities"] == [["COLOUR", "a"], ["COLOUR", "red"], ["COLOUR", "circle"]]  # each B- starts an entity


@pytest.mark.parametrize("task", ["ade20k", "coco_instance_segmentation", "conll"])
def test_pretrained_backbone_reaches_the_dense_model(task, shapes_dir, tmp_path):
    """The fine-tuned model starts from the checkpoint's encoder: a 0-step fine-tune keeps every backbone tensor."""
    from safetensors.torch import load_file

    import multiway

    torch.manual_seed(1)
    source = multiway.create_model("beit3_tiny_patch8_32_textclassification", num_classes=2)
    with torch.no_grad():
        for p in source.beit3.parameters():
            p.add_(torch.randn_like(p))  # far from any fresh initialisation
    multiway.save_pretrained(source, tmp_path / "init.safetensors")
    run = tmp_path / "run"
    cfg = {"task": task, "data_dir": str(shapes_dir), "out_dir": str(run), "tokenizer": str(shapes_dir / "shapes.spm"),
           "model": {"preset": "beit3_tiny_patch8_32", "init": str(tmp_path / "init.safetensors")}, "batch_size": 4,
           "eval_split": "test", "max_text_len": 24, "options": TINY[task],
           "train": {"max_steps": 1, "lr": 1e-6, "min_lr": 1e-6, "warmup_steps": 0, "log_every": 1, "save_every": 0}}
    finetune(from_dict(FinetuneConfig, cfg), progress=False)
    expected = {k: v for k, v in source.state_dict().items() if k.startswith("beit3.")}
    saved = load_file(run / "model.safetensors")
    # one AdamW step at lr 1e-6 moves a tensor by ~1e-6; the +N(0, 1) shift sets the checkpoint apart from any init
    assert expected and all(torch.allclose(saved[k], v, atol=1e-4) for k, v in expected.items())


def test_anchor_scale_sets_the_anchor_sizes():
    from multiway.dense.detection import anchor_sizes, build_detector
    from multiway.model.config import get_config
    from multiway.model.multiway import MultiwayTransformer

    assert anchor_sizes(16) == ((32,), (64,), (128,), (256,), (512,))
    assert anchor_sizes(8, 4) == ((8,), (16,), (32,), (64,), (128,))
    with pytest.raises(ValueError, match="anchor scale"):
        anchor_sizes(8, 0)
    det = build_detector(MultiwayTransformer(get_config("beit3_tiny_patch8_32")), 3, masks=False, out_channels=16, min_size=64,
                         max_size=64, box_head_width=32, anchor_scale=4)
    assert det.detector.rpn.anchor_generator.sizes == anchor_sizes(8, 4)


def test_detector_input_size_and_segmenter_input_scale(shapes_dir):
    """input_size: torchvision resizes the 32-px images to 64 px and maps the boxes back; input_scale: the encoder
    sees the crop at twice the size and the logits come back at the image's."""
    import multiway

    det_task = get_task("coco_detection")({**TINY["coco_instance_segmentation"], "input_size": 64})
    det = det_task.build_model("beit3_tiny_patch8_32", 6).eval()
    assert det.detector.transform.min_size == (64,) and det.detector.transform.max_size == 64
    seen = []
    hook = det.detector.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-2:]))  # returns None
    with torch.no_grad():
        out = det([torch.rand(3, 32, 32)])[0]
    hook.remove()
    assert tuple(seen[0]) == (64, 64) and (out["boxes"] <= 32).all()

    seg = get_task("ade20k")(TINY["ade20k"]).build_model("beit3_tiny_patch8_32", 7).eval()
    sizes = []
    hook = seg.backbone.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[-2:]))
    with torch.no_grad():
        logits, _ = seg(torch.rand(2, 3, 32, 32))
    hook.remove()
    assert tuple(sizes[0]) == (64, 64) and logits.shape == (2, 7, 32, 32)
    with pytest.raises(ValueError, match="input_scale"):
        multiway.create_model("beit3_tiny_patch8_32_semanticsegmentation", num_classes=7, channels=16, aux_channels=8, input_scale=0)


def test_conll_few_shot_subset_is_a_seeded_draw(shapes_dir):
    from multiway.tokenizers.text import TextTokenizer

    data = DataSettings(str(shapes_dir), tokenizer=TextTokenizer(shapes_dir / "shapes.spm"), max_text_len=24)
    full = get_task("conll")().build_dataset("train", data)
    few = get_task("conll")({"train_sentences": 8}).build_dataset("train", data)
    again = get_task("conll")({"train_sentences": 8}).build_dataset("train", data)
    other = get_task("conll")({"train_sentences": 8, "subset_seed": 1}).build_dataset("train", data)
    assert len(few) == 8 and few.indices == again.indices != other.indices
    assert few.indices != list(range(8))  # not the first sentences of the file
    assert [few[i]["language_tokens"].tolist() for i in range(8)] == [full[i]["language_tokens"].tolist() for i in few.indices]
    assert few.sentences == [full.sentences[i] for i in few.indices]  # what the chance level draws its tags from
