"""The prepared GPU suite runs end to end on CPU at tiny sizes, torchscale from the committed wheels included."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_suite_runs_every_section_at_tiny_sizes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_suite", BENCHMARKS / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = tmp_path / "suite.json"
    # generous per-process timeout: the CI machine may be shared
    report = suite.main(["--size", "tiny", "--device", "cpu", "--out", str(out), "--section-timeout", "1200"])
    saved = json.loads(out.read_text())
    assert saved["env"]["size"] == "tiny"
    assert set(saved["section_seconds"]) == {"plans", "backbone", "pretraining", "giant_fsdp", "finetuning"}
    assert "error" not in saved["plans"], saved["plans"]
    assert {"giant_fsdp_fit", "vqav2", "coco_retrieval", "coco_retrieval_ac"} <= set(saved["plans"])
    backbone = saved["backbone"]
    assert backbone["ok"], backbone.get("error")
    impls = {r["impl"] for r in backbone["results"]}
    assert impls == {"multiway", "torchscale"}  # the reference ran from the wheels, same weights
    assert next(r for r in backbone["results"] if r["impl"] == "multiway")["max_abs_diff"] < 1e-4
    assert all(r["ok"] for r in saved["pretraining"]) and all(r["ok"] for r in saved["finetuning"])
    assert saved["giant_fsdp"]["fits"] and saved["giant_fsdp"]["result"]["samples_per_s"] > 0
    assert report["comparison"] and all("planned_peak_bytes" in r or "planned_fit_batch" in r for r in report["comparison"])
