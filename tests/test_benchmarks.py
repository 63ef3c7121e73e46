"""The fine-tuning step benchmark runs the real task losses and writes its table and JSON (tiny preset, CPU)."""

import importlib.util
import json
from pathlib import Path

import pytest

import multiway

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_step_benchmark_runs_both_tasks(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their sibling `bench_common`
    bench = _load("finetune_step")
    out = tmp_path / "ft.json"
    result = bench.main(["--size", "tiny", "--steps", "1", "--warmup", "1", "--num-answers", "20",
                         "--batch", "vqav2=4", "coco_retrieval=6", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    rows = {r["task"]: r for r in saved["rows"]}
    assert set(rows) == {"vqav2", "coco_retrieval"}
    assert rows["vqav2"]["batch"] == 4 and rows["coco_retrieval"]["batch"] == 6
    assert rows["vqav2"]["model"] == "beit3_tiny_patch8_32_vqav2" and rows["coco_retrieval"]["text_len"] == 62
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_gib"] > 0
    assert saved["env"]["precision"] == "fp32"
    assert "samples/s" in capsys.readouterr().out
    # the official-size names resolve to registered presets at the recipes' resolutions
    assert bench.model_name("base", "vqav2") == "beit3_base_patch16_480_vqav2"
    assert bench.model_name("large", "coco_retrieval") == "beit3_large_patch16_384_retrieval"
    registered = multiway.list_models()
    assert all(bench.model_name(size, task) in registered for size in bench.SIZES for task in bench.TASKS)
    with pytest.raises(SystemExit, match="TASK=N"):
        bench.parse_batches(["vqa=3"])
