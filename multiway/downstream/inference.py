"""What every task's prediction on user files shares: the :class:`Predictor` (a model with its tokenizer, labels
and image transform), loading one from a run folder, and reading the user's images with broken files reported by
name. The per-task prediction functions live in the task modules; :mod:`multiway.downstream.predict` gathers them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
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
        return self.downstream.model_limits(self.model)[0]


@dataclass
class Result:
    """What every prediction function returns.

    rows: one dict per processed input; errors: ``"<path>: <reason>"`` for inputs that could not be read;
    output: the object the rows describe when there is one (the :class:`SearchIndex` of ``build_index``).
    """

    rows: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    output: Any = None


@dataclass(frozen=True)
class InMemoryImage:
    """An image given as an object (a PIL image, or a (3, H, W) tensor: uint8, or float in [0, 1]) instead of a
    file; ``name`` stands for it in result rows (``<image 0>``, ...)."""

    name: str
    image: Any

    def __str__(self) -> str:
        return self.name


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
    model_name: str | None = None,
) -> Predictor:
    """Build a :class:`Predictor` from a ``multiway finetune`` output folder, a ``.safetensors`` model, or a module.

    A run folder holds ``model.safetensors`` and ``task.json`` (task, its options, tokenizer, labels), so no other
    argument is needed; explicit ``tokenizer`` / ``labels`` override it. A ``.safetensors`` saved with a tokenizer,
    preprocessing and task (:func:`multiway.save_pretrained`, ``multiway convert --tokenizer``, ``finetune``)
    needs nothing else either. An official ``.pth`` has no config: ``model_name`` (e.g.
    ``beit3_base_patch16_480_vqav2``) builds the model it is loaded into. A bare model gets the registry's first
    task with its head and that task's default options.
    """
    import multiway
    from multiway.config import resolve_path
    from multiway.model.checkpoints import ModelExtras, read_model_extras
    from multiway.model.factory import model_name_of

    from .tasks import get_task, model_file_family, task_for_head

    meta: dict = {}
    extras = ModelExtras()
    family = "beit3"
    if isinstance(model, nn.Module):
        net = model
    else:
        path = resolve_path(model, "model")
        if path.is_dir():
            if (path / "task.json").is_file():
                meta = json.loads((path / "task.json").read_text())
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"model not found: {path} (expected a multiway .safetensors or a finetune output folder)")
        if path.suffix != ".safetensors" and model_name is None:
            from multiway.model.factory import fitting_presets_message

            raise ValueError(fitting_presets_message(path))
        extras = read_model_extras(path)
        # what the file embeds fills in what task.json does not say (a file saved by save_pretrained / convert)
        meta = {**(extras.task or {}), **{k: v for k, v in meta.items() if v is not None}}
        family = model_file_family(str(path))
        if family != "beit3":  # another family's file names its task: that class rebuilds the model
            if not meta.get("task"):
                raise ValueError(f"{model}: a {family} model file without its task cannot predict; save it with task= "
                                 "(multiway finetune does)")
            net = get_task(meta["task"], family).load_model(path)
        else:
            net = multiway.create_model(model_name, pretrained=path) if model_name else multiway.create_model(path)
    family = meta.get("family", family)
    head = meta.get("model_task") or model_name_of(net)
    if not head:
        raise ValueError(f"{model}: a bare backbone cannot predict; give a task model (captioning, vqav2, ...)")
    task_cls = get_task(meta["task"], family) if meta.get("task") else task_for_head(head)
    downstream = task_cls(meta.get("options"))
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device).eval()
    from ..tokenizers.text import TextTokenizer

    tok = None
    tok_path = tokenizer or meta.get("tokenizer")
    if tok_path and not tokenizer and extras.tokenizer is not None and not Path(tok_path).is_file():
        tok_path = None  # a run folder moved away from its tokenizer: the model file carries a copy
    if tok_path:
        tok = TextTokenizer(resolve_path(tok_path, "tokenizer", must_exist=True))
    elif extras.tokenizer is not None:
        tok = TextTokenizer.from_bytes(extras.tokenizer, f"{model} (embedded tokenizer)")
    pre = extras.preprocessing or {}
    if labels is None and meta.get("labels"):
        labels = meta["labels"]
    if isinstance(labels, (str, os.PathLike)):
        labels = read_labels(labels)
    return Predictor(
        model=net,
        task=head,
        downstream=downstream,
        transform=transform_from_preprocessing(pre) if pre else downstream.eval_transform(task_cls.model_limits(net)[0]),
        tokenizer=tok,
        labels=list(labels) if labels is not None else None,
        max_text_len=min(int(meta.get("max_text_len") or pre.get("max_text_len") or 64), task_cls.model_limits(net)[1]),
    )


def transform_from_preprocessing(pre: dict) -> Callable:
    """PIL image or (3, H, W) tensor -> (3, S, S) float tensor, from a model file's embedded preprocessing
    (``img_size``, ``mean``, ``std``, ``interpolation``, ``resize``: ``"squash"`` = Resize((S, S)), or
    ``"center_crop"`` = Resize(int(S / crop_pct)) + CenterCrop(S))."""
    from torchvision.transforms import InterpolationMode, v2

    try:
        size, mean, std = int(pre["img_size"]), list(pre["mean"]), list(pre["std"])
        interpolation = InterpolationMode(pre.get("interpolation", "bicubic"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"embedded preprocessing {pre}: expected img_size, mean, std and an interpolation "
                         f"({', '.join(m.value for m in InterpolationMode)}); {type(e).__name__}: {e}") from e
    resize = pre.get("resize", "squash")
    if resize == "squash":
        ops = [v2.Resize((size, size), interpolation=interpolation, antialias=True)]
    elif resize == "center_crop":
        ops = [v2.Resize(int(size / float(pre.get("crop_pct", 1.0))), interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
    else:
        raise ValueError(f"embedded preprocessing: resize must be 'squash' or 'center_crop', got {resize!r}")
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def list_images(inputs: Any) -> list[Path | InMemoryImage]:
    """Expand folders (recursively, image extensions only, sorted) and keep explicit files as given. Entries that
    are not regular files (a dangling link, a FIFO) are kept, so :func:`read_images` reports them by name.
    PIL images and tensors (one, or in the list) become :class:`InMemoryImage` named ``<image i>``."""
    if isinstance(inputs, (str, os.PathLike, Tensor)) or hasattr(inputs, "getpixel"):
        inputs = [inputs]
    out: list[Path | InMemoryImage] = []
    for i, item in enumerate(inputs):
        if isinstance(item, InMemoryImage):
            out.append(item)
            continue
        if isinstance(item, Tensor) or hasattr(item, "getpixel"):  # a tensor or a PIL image
            out.append(InMemoryImage(f"<image {i}>", item))
            continue
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"images: expected file paths, folders, PIL images or (3, H, W) tensors, got {type(item).__name__}")
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
        if isinstance(p, InMemoryImage):
            if isinstance(p.image, Tensor) and (p.image.ndim != 3 or p.image.shape[0] != 3):
                raise ValueError(f"{p}: an image tensor must be (3, H, W), got {tuple(p.image.shape)}")
            tensors.append(transform(p.image.convert("RGB") if hasattr(p.image, "convert") else p.image))
            ok.append(p)
            continue
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


def require(pred: Predictor, task: str | type, tokenizer: bool = False, labels: bool = False) -> None:
    """Refuse a predictor of another head, or one without the tokenizer / label names the prediction needs.

    task: the head (a model-registry suffix), or a task class: then the predictor's task must be that class or a
    subclass of it (a METER task of the same data), with its head."""
    if isinstance(task, type):
        head = pred.downstream.head if isinstance(pred.downstream, task) else task.head
    else:
        head = task
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
    "InMemoryImage",
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
    "transform_from_preprocessing",
]
