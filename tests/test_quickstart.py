"""The quickstart smoke run: every mode fine-tuned and evaluated, table and pictures written; its settings."""

import json

import pytest

from multiway.downstream.quickstart import QuickstartConfig, _first_colour, _write_text_classification, format_table, quickstart

TASKS = ["imagenet", "vqav2", "nlvr2", "coco_retrieval", "coco_captioning", "text_classification", "coco_detection",
         "coco_instance_segmentation", "ade20k", "conll"]


def test_quickstart_fast(tmp_path):
    rows = quickstart(out_dir=str(tmp_path / "qs"), fast=True)
    assert [r.task for r in rows] == TASKS
    for name in ("results.md", "results.json", "loss_curves.png", "examples.png", "dense_examples.png", "quickstart_config.yaml"):
        assert (tmp_path / "qs" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert len(saved["rows"]) == len(TASKS) and all(0 <= r["chance"] <= 100 for r in saved["rows"] if r["task"] != "coco_captioning")
    assert all(r["pretrained"] is not None and r["scratch"] is not None for r in saved["rows"])
    # per-stage timings, the pretraining held-out accuracies and the captioning baseline are recorded
    assert {"data", "vqkd", "pretrain"} <= set(saved["timings_s"])
    assert all(f"{t}/{i}/{part}" in saved["timings_s"] for t in TASKS for i in ("pretrained", "scratch") for part in ("train", "eval"))
    assert {"text_acc", "text_majority", "image_acc", "image_majority"} <= set(saved["pretraining"])
    assert "coco_captioning_most_frequent_caption" in saved["baselines"]
    assert "pair_text_shuffled_acc" in saved["pretraining"]
    assert "pair_image_acc" in saved["pretraining"]  # pretraining masks the image of pairs too
    # pretraining learns image-text matching too, and its dual encoder is scored before any fine-tuning
    assert 0 <= saved["pretraining"]["itc_i2t_acc"] <= 100 and saved["pretraining"]["itc_chance"] > 0
    assert 0 <= saved["baselines"]["coco_retrieval_zero_shot"] <= 100
    # the fusion tasks are also scored with each example beside another one's image(s)
    for t in ("vqav2", "nlvr2"):
        for init in ("pretrained", "scratch"):
            assert 0 <= saved["baselines"][f"{t}_{init}_other_images"] <= 100
    notes = (tmp_path / "qs" / "results.md").read_text()
    assert "beside another test example's image" in notes and "beside another pair's image" in notes
    assert "before any fine-tuning" in notes and "image-text contrastive top-1" in notes
    # every run folder holds the fine-tuned model and its evaluation on the held-out split
    for t in TASKS:
        for init in ("pretrained", "scratch"):
            run = tmp_path / "qs" / "runs" / f"{t}_{init}"
            assert (run / "model.safetensors").is_file() and list(run.glob("eval_*.json"))
    assert "| task | metric |" in format_table(rows)
    # the text task: the colour a caption names first, written for every split
    data = tmp_path / "qs" / "data"
    lines = (data / "text_classification.train.csv").read_text().splitlines()
    assert lines[0] == "text,label" and len(lines) > 1
    for line in lines[1:]:
        text, label = line.rsplit(",", 1)
        assert _first_colour(text.strip('"')) == label
    # few-shot: at most text_train_per_class labelled captions per colour, drawn from all of them; val/test whole
    labels = [line.rsplit(",", 1)[1] for line in lines[1:]]
    assert max(labels.count(c) for c in set(labels)) <= QuickstartConfig.preset("fast").text_train_per_class
    _write_text_classification(data)  # every caption
    everything = (data / "text_classification.train.csv").read_text().splitlines()
    assert set(lines) < set(everything)
    test_lines = (data / "text_classification.test.csv").read_text().splitlines()
    _write_text_classification(data, train_per_class=3, seed=1)
    again = (data / "text_classification.train.csv").read_text().splitlines()
    assert (data / "text_classification.test.csv").read_text().splitlines() == test_lines
    assert set(again) < set(everything) and all([x.rsplit(",", 1)[1] for x in again].count(c) == 3 for c in set(labels))
    _write_text_classification(data, train_per_class=3, seed=1)
    assert (data / "text_classification.train.csv").read_text().splitlines() == again  # seeded


def test_quickstart_config_presets_and_overrides(tmp_path):
    full, fast = QuickstartConfig.preset("full"), QuickstartConfig.preset("fast")
    assert list(full.tasks) == TASKS == list(fast.tasks)
    assert all(fast.tasks[t].steps < full.tasks[t].steps for t in TASKS)
    cfg = QuickstartConfig.preset("full").update({"pretrain_steps": 7, "tasks": {"vqav2": {"steps": 9}}})
    assert cfg.pretrain_steps == 7 and cfg.tasks["vqav2"].steps == 9 and cfg.tasks["vqav2"].lr == full.tasks["vqav2"].lr
    assert QuickstartConfig.preset("full").tasks["vqav2"].steps == full.tasks["vqav2"].steps  # presets are not mutated
    with pytest.raises(ValueError, match="bogus"):
        QuickstartConfig.preset("full").update({"bogus": 1})
    with pytest.raises(ValueError, match="vqa3"):
        QuickstartConfig.preset("full").update({"tasks": {"vqa3": {"steps": 1}}})
    with pytest.raises(KeyError, match="tiny"):
        QuickstartConfig.preset("tiny")


def test_first_colour():
    assert _first_colour("a big yellow star colored red near the top") == "yellow"
    assert _first_colour("two shapes on a dark background: a red circle and a blue square") == "red"
    assert _first_colour("a big circle colored cyan near the left") == "cyan"
    assert _first_colour("nothing here") is None
