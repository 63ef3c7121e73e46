"""``metrics.csv`` of a run: the CSV logger (its header grows with new keys) and the reader."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any


class CSVLogger:
    """Append rows of ``{column: value}`` to a CSV; the header grows (file rewritten) when new keys appear."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if truncate_after_step is None or int(float(r["step"])) <= truncate_after_step]
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new or not self.path.exists():
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of ``RUN_DIR/metrics.csv`` as dicts of floats (empty cells dropped)."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
