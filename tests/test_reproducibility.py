"""Runs reproduce: a seeded quickstart prints the same table twice, digit for digit, with its fine-tunes spread over
two worker processes; and the multi-seed table is the mean ± sample std of the per-seed tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multiway.config import from_dict
from multiway.downstream.quickstart import QuickstartConfig, Row, format_table, quickstart
from multiway.downstream.quickstart_seeds import format_seed_table, mean_std, parse_seeds, summarize

# The smoke preset on three tasks: six fine-tunes shared by two spawned worker processes, as in the full preset.
SMALL = {"workers": 2, "num_images": 120, "num_pairs": 40, "imagenet_per_class": 2, "vqkd_steps": 4, "pretrain_steps": 4,
         "tasks": {"vqav2": {"steps": 6}, "nlvr2": {"steps": 6}, "text_classification": {"steps": 6}}}


def _config() -> QuickstartConfig:
    settings = QuickstartConfig.preset_dict("fast")
    tasks = {name: {**settings["tasks"][name], **plan} for name, plan in SMALL["tasks"].items()}
    return from_dict(QuickstartConfig, {**settings, **SMALL, "tasks": tasks})


def test_seeded_quickstart_prints_the_same_table_twice(tmp_path, capsys):
    cfg = _config()
    assert list(cfg.tasks) == ["vqav2", "nlvr2", "text_classification"]
    first = quickstart(out_dir=str(tmp_path / "a"), seed=3, config=cfg)
    second = quickstart(out_dir=str(tmp_path / "b"), seed=3, config=cfg)
    capsys.readouterr()
    assert format_table(first) == format_table(second)
    # beyond the printed digits: the scores themselves, every baseline and the pretraining's held-out accuracies
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert a["rows"] == b["rows"] and a["baselines"] == b["baselines"] and a["pretraining"] == b["pretraining"]
    # A few steps hide differences in the last bits that a full run amplifies into points: the loss of every step
    # (VQ-KD, pretraining, each fine-tune) and every weight of every model must be equal bit for bit.
    logs = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("metrics.csv"))
    assert len(logs) == 1 + 1 + 2 * len(cfg.tasks)
    for rel in logs:
        assert _losses(tmp_path / "a" / rel) == _losses(tmp_path / "b" / rel), rel
    models = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("model.safetensors"))
    for rel in models:
        ta, tb = load_file(tmp_path / "a" / rel), load_file(tmp_path / "b" / rel)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel


def _losses(path: Path) -> list[tuple[str, str]]:
    """(step, every loss/accuracy column as written) of a metrics.csv; timings (samples/s) are left out."""
    with open(path, newline="") as f:
        return [tuple(sorted((k, v) for k, v in row.items() if k != "samples_per_s")) for row in csv.DictReader(f)]


def test_mean_std_is_the_sample_spread():
    assert mean_std([1.0]) == (1.0, 0.0)
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))


def test_seed_table_pairs_the_difference_per_seed():
    per_seed = {0: [Row("vqav2", "VQA score", 60.0, 50.0, 4.0), Row("text_classification", "accuracy", None, 90.0, 12.5)],
                1: [Row("vqav2", "VQA score", 64.0, 56.0, 4.0), Row("text_classification", "accuracy", None, 94.0, 12.5)]}
    vqa, text = summarize(per_seed)
    assert vqa.pretrained == pytest.approx((62.0, math.sqrt(8))) and vqa.scratch == pytest.approx((53.0, math.sqrt(18)))
    assert vqa.difference == pytest.approx((9.0, math.sqrt(2)))  # (10, 8): paired, not the difference of the means' spreads
    assert text.pretrained is None and text.difference is None
    table = format_seed_table([vqa, text])
    assert "| vqav2 | VQA score | 62.0 ± 2.8 | 53.0 ± 4.2 | 9.0 ± 1.4 | 4.0 ± 0.0 |" in table
    assert "| text_classification | accuracy | n/a | 92.0 ± 2.8 | n/a | 12.5 ± 0.0 |" in table and "seeds 0,1" in table


def test_seed_table_refuses_mismatched_tasks():
    with pytest.raises(ValueError, match="seed 1 has tasks"):
        summarize({0: [Row("vqav2", "m", 1.0, 1.0, 0.0)], 1: [Row("nlvr2", "m", 1.0, 1.0, 0.0)]})


@pytest.mark.parametrize("text", ["", "0,a", "1,1", " , "])
def test_parse_seeds_names_bad_input(text):
    with pytest.raises(ValueError, match="--seeds expects"):
        parse_seeds(text)
    assert parse_seeds("0, 1,2") == [0, 1, 2]


def test_quickstart_seeds_runs_each_seed_in_its_folder(tmp_path, monkeypatch, capsys):
    import multiway.downstream.quickstart_seeds as QS

    calls = []

    def fake_quickstart(out_dir, seed, config):
        calls.append((out_dir, seed, config))
        return [Row("vqav2", "VQA score", 60.0 + seed, 50.0, 4.0)]

    monkeypatch.setattr(QS, "quickstart", fake_quickstart)
    summary = QS.quickstart_seeds([0, 2], out_dir=tmp_path, config="cfg.yaml")
    assert [(Path(o).name, s, c) for o, s, c in calls] == [("seed_0", 0, "cfg.yaml"), ("seed_2", 2, "cfg.yaml")]
    assert summary[0].pretrained == pytest.approx((61.0, math.sqrt(2)))
    assert "| vqav2 | VQA score | 61.0 ± 1.4 | 50.0 ± 0.0 | 11.0 ± 1.4 | 4.0 ± 0.0 |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "results_seeds.json").read_text())
    assert saved["seeds"] == [0, 2] and (tmp_path / "results_seeds.md").read_text().startswith("| task |")
