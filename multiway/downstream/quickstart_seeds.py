"""The quickstart over several seeds, and its table of mean ± standard deviation.

One draw of the quickstart says little about a gap of a point between "from pretrained" and "from scratch": the
seed changes the built-in data, the initialisations and the data order. ``multiway quickstart --seeds 0,1,2`` runs
:func:`multiway.downstream.quickstart.quickstart` once per seed (``OUT/seed_<s>``, each its own complete run) and
prints, per task, the mean ± sample standard deviation over the seeds of both columns and of their paired
difference (pretrained − scratch, per seed), so a claim such as "pretraining helps" is read against the spread.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .quickstart import QuickstartConfig, Row, quickstart


@dataclass
class SeedSummary:
    """One task over the seeds: mean and sample standard deviation (0 for one seed) of each column."""

    task: str
    metric: str
    seeds: list[int]
    pretrained: tuple[float, float] | None  # (mean, std); None when the task has no pretrained column
    scratch: tuple[float, float]
    difference: tuple[float, float] | None  # pretrained - scratch, paired per seed
    chance: tuple[float, float]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; an error names what was given."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds expects comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds expects distinct comma-separated integers such as 0,1,2, got {text!r}")
    return seeds


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def summarize(per_seed: dict[int, list[Row]]) -> list[SeedSummary]:
    """Per-task summaries of the tables of several seeds (every seed must have the same tasks in the same order)."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    for s in seeds[1:]:
        if [r.task for r in per_seed[s]] != [r.task for r in first]:
            raise ValueError(f"seed {s} has tasks {[r.task for r in per_seed[s]]}, seed {seeds[0]} has {[r.task for r in first]}")
    out = []
    for i, row in enumerate(first):
        rows = [per_seed[s][i] for s in seeds]
        has_pre = all(r.pretrained is not None for r in rows)
        out.append(SeedSummary(
            task=row.task, metric=row.metric, seeds=seeds,
            pretrained=mean_std([r.pretrained for r in rows]) if has_pre else None,
            scratch=mean_std([r.scratch for r in rows]),
            difference=mean_std([r.pretrained - r.scratch for r in rows]) if has_pre else None,
            chance=mean_std([r.chance for r in rows]),
        ))
    return out


def format_seed_table(summaries: list[SeedSummary]) -> str:
    """Markdown table: mean ± std over the seeds for each column and for the paired difference."""
    fmt = lambda ms: "n/a" if ms is None else f"{ms[0]:.1f} ± {ms[1]:.1f}"  # noqa: E731
    seeds = ",".join(str(s) for s in summaries[0].seeds) if summaries else ""
    lines = ["| task | metric | from pretrained | from scratch | pretrained − scratch | chance |", "|---|---|---|---|---|---|"]
    lines += [f"| {s.task} | {s.metric} | {fmt(s.pretrained)} | {fmt(s.scratch)} | {fmt(s.difference)} | {fmt(s.chance)} |"
              for s in summaries]
    return "\n".join(lines) + f"\n\nmean ± sample standard deviation over seeds {seeds}"


def quickstart_seeds(seeds: Sequence[int], out_dir: str | os.PathLike = "quickstart",
                     config: QuickstartConfig | str | os.PathLike | None = None) -> list[SeedSummary]:
    """Run the quickstart once per seed into ``out_dir/seed_<s>``; print and write (``results_seeds.md``/``.json``)
    the mean ± std table. Returns the per-task summaries."""
    out = Path(out_dir)
    per_seed = {int(s): quickstart(out_dir=str(out / f"seed_{s}"), seed=int(s), config=config) for s in seeds}
    summaries = summarize(per_seed)
    table = format_seed_table(summaries)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results_seeds.md").write_text(table + "\n")
    (out / "results_seeds.json").write_text(json.dumps({
        "seeds": list(per_seed),
        "per_seed": {s: [r.__dict__ for r in rows] for s, rows in per_seed.items()},
        "summary": [s.__dict__ for s in summaries]}, indent=2))
    return summaries


__all__ = ["SeedSummary", "format_seed_table", "mean_std", "parse_seeds", "quickstart_seeds", "summarize"]
