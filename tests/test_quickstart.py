"""The quickstart smoke run: every mode fine-tuned and evaluated, table and pictures written."""

import json

from multiway.evaluate.quickstart import format_table, quickstart


def test_quickstart_fast(tmp_path):
    rows = quickstart(out_dir=str(tmp_path / "qs"), fast=True)
    tasks = [r.task for r in rows]
    assert tasks == ["imagenet", "vqav2", "nlvr2", "coco_retrieval", "coco_captioning", "text_classification"]
    for name in ("results.md", "results.json", "loss_curves.png", "examples.png"):
        assert (tmp_path / "qs" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert len(saved["rows"]) == 6 and all(0 <= r["chance"] <= 100 for r in saved["rows"] if r["task"] != "coco_captioning")
    assert "| task | metric |" in format_table(rows)
