"""What every task's prediction on user files shares: the :class:`Predictor` (a model with its tokenizer, labels
and image transform), loading one from a run folder, and reading the user's images with broken files reported by
name. The per-task prediction functions live in the task modules; :mod:`multiway.downstream.predict` gathers them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Predictor:
    """A model ready for inference with what it needs around it.

    model: a task head in eval mode; task: its model-registry suffix (``captioning``, ``vqav2``, ...);
    downstream: the :class:`~multiway.downstream.tasks.DownstreamTask` it was trained for (with the run's options);
    tokenizer: a :class:`multiway.tokenizers.TextTokenizer` (text tasks); labels: class names / answers by id;
    transform: PIL image -> (3, S, S) tensor, the task's evaluation transform; max_text_len: token budget T of
    text inputs.
    """

    model: nn.Module
    task: str
    downstream: Any
    transform: Callable
    tokenizer: Any = None
    labels: list[str] | None = None
    max_text_len: int = 64

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def img_size(self) -> int:
        return self.model.config.img_size


@dataclass
class Result:
    """rows: one dict per processed input; errors: ``"<path>: <reason>"`` for inputs that could not be read."""

    rows: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names / answers by id from ``answer2label.txt`` (jsonl ``{"answer", "label"}``), a json list,
    or a plain text file with one name per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    text = path.read_text().strip()
    if text.startswith("["):
        return [str(x) for x in json.loads(text)]
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        pairs = {}
        for n, line in enumerate(lines, 1):
            row = json.loads(line)
            if "answer" not in row or "label" not in row:
                raise ValueError(f"{path}:{n}: expected {{'answer', 'label'}}, got keys {sorted(row)}")
            pairs[int(row["label"])] = str(row["answer"])
        return [pairs[i] for i in range(len(pairs))]
    return [line.strip() for line in lines]


def load_predictor(
    model: str | os.PathLike | nn.Module,
    tokenizer: str | os.PathLike | None = None,
    labels: str | os.PathLike | Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> Predictor:
    """Build a :class:`Predictor` from a ``multiway finetune`` output folder, a ``.safetensors`` model, or a module.

    A run folder holds ``model.safetensors`` and ``task.json`` (task, its options, tokenizer, labels), so no other
    argument is needed; explicit ``tokenizer`` / ``labels`` override it. A bare model gets the registry's first
    task with its head and that task's default options.
    """
    import multiway
    from multiway.model.factory import model_name_of

    from .tasks import get_task, task_for_head

    meta: dict = {}
    if isinstance(model, nn.Module):
        net = model
    else:
        path = Path(model)
        if path.is_dir():
            if (path / "task.json").is_file():
                meta = json.loads((path / "task.json").read_text())
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"model not found: {path} (expected a multiway .safetensors or a finetune output folder)")
        net = multiway.create_model(path)
    head = meta.get("model_task") or model_name_of(net)
    if not head:
        raise ValueError(f"{model}: a bare backbone cannot predict; give a task model (captioning, vqav2, ...)")
    task_cls = get_task(meta["task"]) if meta.get("task") else task_for_head(head)
    downstream = task_cls(meta.get("options"))
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device).eval()
    tok = None
    tok_path = tokenizer or meta.get("tokenizer")
    if tok_path:
        from ..tokenizers.text import TextTokenizer

        tok = TextTokenizer(tok_path)
    if labels is None and meta.get("labels"):
        labels = meta["labels"]
    if isinstance(labels, (str, os.PathLike)):
        labels = read_labels(labels)
    return Predictor(
        model=net,
        task=head,
        downstream=downstream,
        transform=downstream.eval_transform(net.config.img_size),
        tokenizer=tok,
        labels=list(labels) if labels is not None else None,
        max_text_len=min(int(meta.get("max_text_len", 64)), net.config.max_text_positions - 2),
    )


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders (recursively, image extensions only, sorted) and keep explicit files as given. Entries that
    are not regular files (a dangling link, a FIFO) are kept, so :func:`read_images` reports them by name."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if not q.is_dir() and q.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out


def read_images(paths: Sequence[Path], transform: Callable) -> tuple[list[Tensor], list[Path], list[str]]:
    """Open (bounded, see :func:`multiway.data.io.load_image`) and transform each image; a file that fails is
    reported as ``"<path>: <reason>"`` and skipped."""
    from ..data.io import ImageError, load_image

    tensors, ok, errors = [], [], []
    for p in paths:
        try:
            tensors.append(transform(load_image(p)))
            ok.append(p)
        except ImageError as e:
            errors.append(str(e))
    return tensors, ok, errors


def image_batches(pred: Predictor, paths: Sequence[Path], batch_size: int, result: Result) -> Iterator[tuple[Tensor, list[Path]]]:
    """Yield (images (B, 3, S, S) on the model's device, their paths); unreadable files go to ``result.errors``."""
    for i in range(0, len(paths), batch_size):
        tensors, ok, errors = read_images(paths[i : i + batch_size], pred.transform)
        result.errors.extend(errors)
        if tensors:
            yield torch.stack(tensors).to(pred.device), ok


def require(pred: Predictor, head: str, tokenizer: bool = False, labels: bool = False) -> None:
    """Refuse a predictor of another head, or one without the tokenizer / label names the prediction needs."""
    if pred.task != head:
        raise ValueError(f"this needs a {head} model, got a {pred.task} model")
    if tokenizer and pred.tokenizer is None:
        raise ValueError(f"the {pred.task} model needs a text tokenizer: pass --tokenizer (a SentencePiece .model/.spm)")
    if labels and pred.labels is None:
        raise ValueError(f"the {pred.task} model needs label names: pass --labels (answer2label.txt or one name per line)")


def encode_texts(pred: Predictor, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Texts -> (language_tokens (N, T), padding_mask (N, T)) on the model's device."""
    enc = pred.tokenizer(list(texts), max_len=pred.max_text_len)
    return enc["language_tokens"].to(pred.device), enc["padding_mask"].to(pred.device)


def print_result(result: Result, as_json: bool, strict: bool = False) -> int:
    """Rows on stdout, skipped inputs by name on stderr. Exit status 1 when nothing could be processed, or with
    ``strict`` when any input was skipped."""
    import sys

    for err in result.errors:
        print(f"skipped: {err}", file=sys.stderr)
    for row in result.rows:
        print(json.dumps(row) if as_json else "  ".join(f"{k}={v}" for k, v in row.items()))
    if result.errors:
        print(f"{len(result.errors)} input(s) skipped, {len(result.rows)} processed", file=sys.stderr)
    return 1 if result.errors and (strict or not result.rows) else 0


__all__ = [
    "IMAGE_EXTENSIONS",
    "Predictor",
    "Result",
    "encode_texts",
    "image_batches",
    "list_images",
    "load_predictor",
    "print_result",
    "read_images",
    "read_labels",
    "require",
]
