"""File I/O and the broken-input policy shared by every reader: :class:`DataError`, :class:`DataErrors`, JSON lines
and images, and the official index file names of a task split.

Broken input policy (``on_error``):

* ``"raise"`` (default): a :class:`DataError` naming the file, the line and what was expected;
* ``"skip"``: the bad line or sample is skipped and counted in a :class:`DataErrors`. Bad index lines are
  dropped when the dataset is built (``dataset.errors``); a bad image found while loading makes
  ``__getitem__`` return ``None``, which ``collate_batch`` drops and lists under ``batch["skipped"]``
  (so it is reported from dataloader workers too); ``errors.absorb(batch)`` counts those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from multiway.constants import INDEX_FILES


class DataError(RuntimeError):
    """A broken input file, always naming the file (and line) and what was expected."""


class DataErrors:
    """Skip-or-raise policy plus a counter of what was skipped.

    ``handle(where, reason)`` raises :class:`DataError` under ``on_error="raise"``; under ``"skip"`` it counts
    the problem and keeps the first ``keep`` locations for :meth:`summary`.
    """

    def __init__(self, on_error: str = "raise", keep: int = 5) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error, self.keep = on_error, keep
        self.count = 0
        self.examples: list[str] = []

    def handle(self, where: str, reason: str | BaseException) -> None:
        msg = f"{where}: {reason}"
        if self.on_error == "raise":
            raise DataError(msg) from (reason if isinstance(reason, BaseException) else None)
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(msg)

    def absorb(self, batch: Mapping[str, Any] | None) -> bool:
        """Count the samples a collated batch reports as skipped; True if the batch still holds samples."""
        if not batch:
            return False
        for msg in batch.get("skipped", ()):
            self.count += 1
            if len(self.examples) < self.keep:
                self.examples.append(msg)
        return int(batch.get("batch_size", 0)) > 0

    def summary(self) -> str:
        if not self.count:
            return "no broken inputs"
        head = "\n  ".join(self.examples)
        more = f"\n  ... and {self.count - len(self.examples)} more" if self.count > len(self.examples) else ""
        return f"skipped {self.count} broken input(s):\n  {head}{more}"

    def __repr__(self) -> str:
        return f"DataErrors(on_error={self.on_error!r}, count={self.count})"


def read_jsonl(path: str | os.PathLike, errors: DataErrors, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Items of a JSON-lines file; malformed lines and items missing ``required`` keys go to ``errors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                errors.handle(f"{path}:{lineno}", f"malformed JSON ({e.msg})")
                continue
            if not isinstance(item, dict):
                errors.handle(f"{path}:{lineno}", f"expected a JSON object, got {type(item).__name__}")
                continue
            missing = [k for k in required if k not in item]
            if missing:
                errors.handle(f"{path}:{lineno}", f"missing field(s) {missing}; expected {list(required)}")
                continue
            item["_where"] = f"{path.name}:{lineno}"
            items.append(item)
    return items


def write_jsonl(path: str | os.PathLike, items: Iterable[Mapping[str, Any]]) -> int:
    """Write items as JSON lines (atomically); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def load_image(path: str | os.PathLike):
    """Open an image file as RGB PIL image (fully decoded here, so a truncated file fails here, not later)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def index_files(task: str, split: str) -> tuple[str, ...]:
    """The official index file names of a task's split (§5)."""
    if task not in INDEX_FILES:
        raise KeyError(f"unknown task {task!r}; known: {sorted(INDEX_FILES)}")
    if split not in INDEX_FILES[task]:
        raise KeyError(f"task {task!r} has no split {split!r}; known: {sorted(INDEX_FILES[task])}")
    return INDEX_FILES[task][split]
