"""Inference on the user's own files: caption, answer, classify, judge (NLVR2), embed and search.

Every function takes a model (a task head, see :func:`load_predictor`) and file paths or folders. Images that
cannot be read are reported by name in the result's ``errors`` and skipped; the rest are still processed.

>>> p = load_predictor("runs/captioning")            # a `multiway finetune` output folder (or a .safetensors)
>>> caption(p, ["photos/"]).rows                      # [{"path": "photos/a.jpg", "caption": "..."}]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
VL_MEAN = VL_STD = (0.5, 0.5, 0.5)  # BEiT-3 vision-language tasks (IMAGENET_INCEPTION_MEAN/STD)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Predictor:
    """A model ready for inference with what it needs around it.

    model: a task head in eval mode; task: its head suffix (``captioning``, ``vqav2``, ...);
    tokenizer: a :class:`multiway.tokenizers.TextTokenizer` (text tasks); labels: class names / answers by id;
    mean/std: image normalisation; max_text_len: token budget of text inputs.
    """

    model: nn.Module
    task: str
    tokenizer: object | None = None
    labels: list[str] | None = None
    mean: tuple[float, ...] = VL_MEAN
    std: tuple[float, ...] = VL_STD
    max_text_len: int = 64
    options: dict = field(default_factory=dict)

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


# --- loading --------------------------------------------------------------------------------------------


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

    A run folder holds ``model.safetensors`` and ``task.json`` (task, tokenizer, labels, normalisation), so no
    other argument is needed; explicit ``tokenizer`` / ``labels`` override it.
    """
    import multiway
    from multiway.model.factory import model_name_of

    from .. import model as _  # noqa: F401  (registry)

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
    task = meta.get("model_task") or model_name_of(net)
    if not task:
        raise ValueError(f"{model}: a bare backbone cannot predict; give a task model (captioning, vqav2, ...)")
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
    imagenet_norm = meta.get("normalize", "vl" if task != "imageclassification" else "imagenet") == "imagenet"
    return Predictor(
        model=net,
        task=task,
        tokenizer=tok,
        labels=list(labels) if labels is not None else None,
        mean=IMAGENET_MEAN if imagenet_norm else VL_MEAN,
        std=IMAGENET_STD if imagenet_norm else VL_STD,
        max_text_len=min(int(meta.get("max_text_len", 64)), net.config.max_text_positions - 2),
        options=dict(meta.get("generation", {})),
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


def image_transform(pred: Predictor):
    """The task's evaluation transform (:func:`multiway.data.transforms.build_transform`): squash-resize for
    vision-language tasks, resize + centre crop with ImageNet statistics for classification."""
    from ..data.transforms import build_transform

    return build_transform("imagenet" if pred.mean == IMAGENET_MEAN else "vqav2", is_train=False, img_size=pred.img_size)


def read_images(paths: Sequence[Path], transform) -> tuple[list[Tensor], list[Path], list[str]]:
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


def _batches(pred: Predictor, paths: Sequence[Path], batch_size: int, result: Result):
    """Yield (image batch on device, its paths); unreadable files go to ``result.errors``."""
    transform = image_transform(pred)
    for i in range(0, len(paths), batch_size):
        tensors, ok, errors = read_images(paths[i : i + batch_size], transform)
        result.errors.extend(errors)
        if tensors:
            yield torch.stack(tensors).to(pred.device), ok


def _require(pred: Predictor, task: str | tuple[str, ...], tokenizer: bool = False, labels: bool = False) -> None:
    tasks = (task,) if isinstance(task, str) else task
    if pred.task not in tasks:
        raise ValueError(f"this needs a {' or '.join(tasks)} model, got a {pred.task} model")
    if tokenizer and pred.tokenizer is None:
        raise ValueError(f"the {pred.task} model needs a text tokenizer: pass --tokenizer (a SentencePiece .model/.spm)")
    if labels and pred.labels is None:
        raise ValueError(f"the {pred.task} model needs label names: pass --labels (answer2label.txt or one name per line)")


def _encode_texts(pred: Predictor, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    enc = pred.tokenizer(list(texts), max_len=pred.max_text_len)
    return enc["language_tokens"].to(pred.device), enc["padding_mask"].to(pred.device)


# --- tasks ----------------------------------------------------------------------------------------------


@torch.no_grad()
def caption(pred: Predictor, inputs: Iterable[str | os.PathLike], num_beams: int | None = None, max_len: int | None = None,
            length_penalty: float | None = None, batch_size: int = 16) -> Result:
    """Caption every image: rows ``{"path", "caption"}`` (beam search with the KV cache; ``num_beams=1`` is greedy)."""
    from ..model.generation import generate

    _require(pred, "captioning", tokenizer=True)
    opts = pred.options
    num_beams = num_beams or int(opts.get("num_beams", 3))
    max_len = max_len or int(opts.get("max_len", min(32, pred.max_text_len)))
    length_penalty = float(opts.get("length_penalty", 0.6)) if length_penalty is None else length_penalty
    result = Result()
    for images, ok in _batches(pred, list_images(inputs), batch_size, result):
        out = generate(pred.model, images, pred.tokenizer.mask_id, num_beams=num_beams, max_len=max_len, length_penalty=length_penalty,
                       vocab_limit=pred.tokenizer.vocab_size)
        for p, seq in zip(ok, out.sequences):
            result.rows.append({"path": str(p), "caption": pred.tokenizer.decode(seq)})
    return result


@torch.no_grad()
def answer(pred: Predictor, inputs: Iterable[str | os.PathLike], question: str, topk: int = 3, batch_size: int = 16) -> Result:
    """Answer ``question`` about every image: rows ``{"path", "answer", "top": [[answer, prob], ...]}``."""
    _require(pred, "vqav2", tokenizer=True, labels=True)
    result = Result()
    for images, ok in _batches(pred, list_images(inputs), batch_size, result):
        ids, pad = _encode_texts(pred, [question] * len(ok))
        probs = pred.model(image=images, question=ids, padding_mask=pad).float().sigmoid()
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        for p, vals, idx in zip(ok, top.values, top.indices):
            pairs = [[pred.labels[i], round(v, 4)] for v, i in zip(vals.tolist(), idx.tolist())]
            result.rows.append({"path": str(p), "question": question, "answer": pairs[0][0], "top": pairs})
    return result


@torch.no_grad()
def classify(pred: Predictor, inputs: Iterable[str | os.PathLike], topk: int = 5, batch_size: int = 32) -> Result:
    """Classify every image: rows ``{"path", "label", "top": [[name, prob], ...]}``."""
    _require(pred, "imageclassification")
    result = Result()
    for images, ok in _batches(pred, list_images(inputs), batch_size, result):
        probs = pred.model(image=images).float().softmax(-1)
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        for p, vals, idx in zip(ok, top.values, top.indices):
            names = [pred.labels[i] if pred.labels else str(i) for i in idx.tolist()]
            pairs = [[n, round(v, 4)] for n, v in zip(names, vals.tolist())]
            result.rows.append({"path": str(p), "label": pairs[0][0], "top": pairs})
    return result


@torch.no_grad()
def judge(pred: Predictor, image_a: str | os.PathLike, image_b: str | os.PathLike, statement: str) -> Result:
    """NLVR2: is ``statement`` true of the image pair? One row ``{"image_a", "image_b", "statement", "true", "prob_true"}``."""
    _require(pred, "nlvr2", tokenizer=True)
    result = Result()
    tensors, ok, errors = read_images([Path(image_a), Path(image_b)], image_transform(pred))
    result.errors.extend(errors)
    if len(ok) < 2:
        return result
    ids, pad = _encode_texts(pred, [statement])
    a, b = (t.unsqueeze(0).to(pred.device) for t in tensors)
    prob = pred.model(image_a=a, image_b=b, text_description=ids, padding_mask=pad).float().softmax(-1)[0, 1].item()
    result.rows.append({"image_a": str(image_a), "image_b": str(image_b), "statement": statement, "true": prob > 0.5, "prob_true": round(prob, 4)})
    return result


@torch.no_grad()
def embed_images(pred: Predictor, inputs: Iterable[str | os.PathLike], batch_size: int = 32) -> tuple[np.ndarray, list[str], list[str]]:
    """Dual-encoder image embeddings: (N, D) float32 unit vectors, their paths, and the errors."""
    _require(pred, "retrieval")
    result, feats, paths = Result(), [], []
    for images, ok in _batches(pred, list_images(inputs), batch_size, result):
        feats.append(pred.model.encode_image(images).float().cpu())
        paths.extend(str(p) for p in ok)
    dim = pred.model.config.embed_dim
    return (torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32)), paths, result.errors


@torch.no_grad()
def embed_texts(pred: Predictor, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Dual-encoder text embeddings: (N, D) float32 unit vectors."""
    _require(pred, "retrieval", tokenizer=True)
    feats = []
    for i in range(0, len(texts), batch_size):
        ids, pad = _encode_texts(pred, texts[i : i + batch_size])
        feats.append(pred.model.encode_text(ids, pad).float().cpu())
    return torch.cat(feats).numpy() if feats else np.zeros((0, pred.model.config.embed_dim), np.float32)


def save_embeddings(path: str | os.PathLike, embeddings: np.ndarray, names: Sequence[str]) -> tuple[Path, Path]:
    """Write ``<path>.npy`` (N, D) and ``<path>.txt`` (the N names, one a line, same order)."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix == ".npy" else base
    base.parent.mkdir(parents=True, exist_ok=True)
    np.save(base.with_suffix(".npy"), embeddings.astype(np.float32))
    base.with_suffix(".txt").write_text("".join(f"{n}\n" for n in names))
    return base.with_suffix(".npy"), base.with_suffix(".txt")


@dataclass
class SearchIndex:
    """Unit-norm image embeddings (N, D) with their paths."""

    embeddings: np.ndarray
    paths: list[str]

    def save(self, path: str | os.PathLike) -> Path:
        return save_embeddings(path, self.embeddings, self.paths)[0]

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchIndex:
        base = Path(path).with_suffix("")
        emb = np.load(base.with_suffix(".npy"))
        paths = base.with_suffix(".txt").read_text().splitlines()
        if len(paths) != emb.shape[0]:
            raise ValueError(f"{base}.npy has {emb.shape[0]} rows but {base}.txt names {len(paths)} images")
        return cls(emb, paths)


def build_index(pred: Predictor, inputs: Iterable[str | os.PathLike], batch_size: int = 32) -> tuple[SearchIndex, list[str]]:
    """Embed a folder of images for search. Returns (index, errors)."""
    emb, paths, errors = embed_images(pred, inputs, batch_size)
    return SearchIndex(emb, paths), errors


def search_text(pred: Predictor, index: SearchIndex, query: str, k: int = 5) -> list[dict]:
    """Top-``k`` images of ``index`` for a text query: ``[{"path", "score"}]`` by cosine similarity."""
    q = embed_texts(pred, [query])[0]
    scores = index.embeddings @ q
    order = np.argsort(-scores)[:k]
    return [{"path": index.paths[i], "score": round(float(scores[i]), 4)} for i in order]


def search_image(pred: Predictor, image: str | os.PathLike, texts: Sequence[str], k: int = 5) -> Result:
    """The reverse: top-``k`` of ``texts`` for an image query: one row ``{"path", "hits": [{"text", "score"}]}``."""
    emb, paths, errors = embed_images(pred, [image])
    result = Result(errors=errors)
    if not paths:
        return result
    t = embed_texts(pred, texts)
    scores = t @ emb[0]
    order = np.argsort(-scores)[:k]
    result.rows.append({"path": paths[0], "hits": [{"text": texts[i], "score": round(float(scores[i]), 4)} for i in order]})
    return result


__all__ = [
    "Predictor",
    "Result",
    "SearchIndex",
    "answer",
    "build_index",
    "caption",
    "classify",
    "embed_images",
    "embed_texts",
    "judge",
    "list_images",
    "load_predictor",
    "read_images",
    "read_labels",
    "save_embeddings",
    "search_image",
    "search_text",
]
