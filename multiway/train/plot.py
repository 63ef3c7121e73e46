"""``multiway plot RUN_DIR``: PNG curves from ``RUN_DIR/metrics.csv`` (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import os
from pathlib import Path

from .metrics_log import read_metrics


def _series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``loss.png`` (total and per-stream losses), ``accuracy.png`` (train masked-token accuracy per stream,
    held-out accuracy and majority baselines when logged), ``lr.png`` and ``throughput.png``. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{Path(run_dir) / 'metrics.csv'} has no rows yet")
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r if k != "step"})
    panels = {
        "loss": [k for k in keys if k == "loss" or k.endswith("/loss")],
        "accuracy": [k for k in keys if k.endswith("/acc") or (k.startswith("eval/") and (k.endswith("_acc") or k.endswith("_majority")))],
        "lr": ["lr"] if "lr" in keys else [],
        "throughput": ["samples_per_s"] if "samples_per_s" in keys else [],
    }
    other_eval = [k for k in keys if k.startswith("eval/") and k not in panels["accuracy"]]
    if other_eval:
        panels["eval"] = other_eval
    written = []
    for name, ks in panels.items():
        if not ks:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for k in ks:
            x, y = _series(rows, k)
            style = "--" if k.endswith("_majority") else ("o-" if k.startswith("eval/") else "-")
            ax.plot(x, y, style, label=k, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(f"{Path(run_dir).name}: {name}")
        if name == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


__all__ = ["plot_run"]
