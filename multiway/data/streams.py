"""Pretraining streams: images, texts and image-text pairs as IterableDatasets.

Sources (``source`` may be one of these or a list of them):

* webdataset tar shards — a path, a glob (``shards/*.tar``), a brace range
  (``shards/train-{000000..000099}.tar``) or a folder holding ``*.tar``. Samples are grouped by key (the file
  name up to its first dot): an image (``jpg``/``jpeg``/``png``/``webp``), a text (``txt``), optional ``json``
  metadata and optional precomputed visual tokens (``visual_tokens.npy``, or ``visual_tokens`` in the json);
* a folder of image files (ImageStream);
* ``.txt`` files, one text per line (TextStream);
* ``.jsonl`` files with ``image_path`` (relative to the file's folder), ``text`` / ``caption`` /
  ``text_segment`` (a string or token ids) and optional ``visual_tokens`` (PairStream, ImageStream, TextStream).

Sharding: the stream is split over ``world_size x num_workers`` readers (rank from ``torch.distributed`` or the
constructor, worker from ``torch.utils.data.get_worker_info``). When there are at least as many files as
readers, whole files are dealt out (file ``i`` goes to reader ``i % readers``); otherwise every reader scans the
files and keeps samples ``i % readers``. Either way each sample is read by exactly one reader per epoch.

Broken input (unreadable shard, corrupt image, malformed line, missing field) follows ``on_error`` as in
:mod:`multiway.data.io`: ``"raise"`` raises :class:`DataError` naming the file (and member or line);
``"skip"`` skips it, counts it in ``stream.errors`` and, when a reader finishes, warns with the count and the
first few names (from inside the dataloader worker that met them).
"""

from __future__ import annotations

import abc
import glob
import io
import json
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiway.data.io import DataError, DataErrors, ImageError, iter_lines, load_image, parse_json_object

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
TEXT_KEYS = ("text", "caption", "text_segment")


def expand_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Resolve a source spec to a sorted list of files (see the module docstring)."""
    if isinstance(source, (list, tuple)):
        return [p for s in source for p in expand_source(s)]
    s = str(source)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", s)
    if m:
        a, b = m.group(1), m.group(2)
        return [p for i in range(int(a), int(b) + 1)
                for p in expand_source(s[:m.start()] + str(i).zfill(len(a)) + s[m.end():])]
    if any(c in s for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(s))
        if not files:
            raise FileNotFoundError(f"no files match {s}")
        return files
    p = Path(s)
    if p.is_dir():
        tars = sorted(p.glob("*.tar"))
        if tars:
            return tars
        files = sorted(f for f in p.rglob("*") if f.suffix.lower().lstrip(".") in IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"{p}: no .tar shards or images inside")
        return files
    if not p.exists():
        raise FileNotFoundError(f"stream source not found: {p}")
    return [p]


def reader_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(this reader's global index, number of readers) over ranks x dataloader workers."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    info = torch.utils.data.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world_size * nw


class _Stream(torch.utils.data.IterableDataset, abc.ABC):
    """Common machinery: file listing, sharding, shuffling, errors. Subclasses turn records into samples."""

    def __init__(self, source, rank: int | None = None, world_size: int | None = None, on_error: str = "raise",
                 shuffle: bool = False, seed: int = 0, repeat: bool = False) -> None:
        super().__init__()
        self.files = expand_source(source)
        self.rank, self.world_size = rank, world_size
        self.errors = DataErrors(on_error)
        self.shuffle, self.seed, self.repeat = shuffle, seed, repeat
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle file order per epoch (same on every reader, so the split stays a partition)."""
        self.epoch = epoch

    # -- records: (where, key, {field: value}) -----------------------------------------------------------------

    def _records(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        suffix = path.suffix.lower()
        if suffix == ".tar":
            yield from self._tar_records(path)
        elif suffix == ".jsonl":
            for lineno, line, bad in iter_lines(path):
                item, bad = parse_json_object(line) if bad is None else (None, bad)
                where = f"{path}:{lineno}"
                if item is None:
                    yield where, {"_error": bad}
                elif "image_path" in item and not isinstance(item["image_path"], str):
                    yield where, {"_error": f"image_path must be a string, got {type(item['image_path']).__name__}"}
                else:
                    if "image_path" in item:
                        item["image_file"] = path.parent / item["image_path"]
                    yield where, item
        elif suffix == ".txt":
            for lineno, line, bad in iter_lines(path):
                yield f"{path}:{lineno}", ({"_error": bad} if bad is not None else {"text": line})
        elif suffix.lstrip(".") in IMAGE_EXTS:
            yield str(path), {"image_file": path}
        else:
            yield str(path), {"_error": f"unsupported file type {suffix!r} (expected .tar, .jsonl, .txt or an image)"}

    @staticmethod
    def _tar_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            tar = tarfile.open(path, "r")
        except (tarfile.TarError, OSError) as e:
            yield str(path), {"_error": f"cannot open tar shard: {e}"}
            return
        key, rec = None, {}
        try:
            with tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name
                    base = name.rsplit("/", 1)[-1]
                    k = name[: len(name) - len(base)] + base.split(".", 1)[0]
                    ext = base.split(".", 1)[1].lower() if "." in base else ""
                    if k != key:
                        if key is not None:
                            yield f"{path}:{key}", rec
                        key, rec = k, {}
                    rec[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as e:
            if key is not None:
                rec = {"_error": f"truncated or corrupt tar shard ({e})"}
            else:
                yield str(path), {"_error": f"truncated or corrupt tar shard ({e})"}
                return
        if key is not None:
            yield f"{path}:{key}", rec

    # -- iteration ------------------------------------------------------------------------------------------

    def iter_reader(self, reader: int, num_readers: int) -> Iterator[dict[str, Any]]:
        """Samples of reader ``reader`` out of ``num_readers`` (what ``__iter__`` runs in each worker/rank)."""
        files = list(self.files)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(files)
        by_file = len(files) >= num_readers
        mine = files[reader::num_readers] if by_file else files
        rng = random.Random(self.seed * 7919 + self.epoch * 104729 + reader)
        i = -1
        for path in mine:
            for where, rec in self._records(path):
                i += 1
                if not by_file and i % num_readers != reader:
                    continue
                if "_error" in rec:
                    self.errors.handle(where, rec["_error"])
                    continue
                try:
                    sample = self.make_sample(where, rec, rng)
                except DataError as e:
                    if self.errors.on_error == "raise":
                        raise
                    self.errors.handle(where, str(e).split(": ", 1)[-1])
                    continue
                sample["key"] = where
                yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, n = reader_info(self.rank, self.world_size)
        while True:
            yield from self.iter_reader(reader, n)
            if self.errors.count:
                warnings.warn(f"{type(self).__name__} reader {reader}/{n}: {self.errors.summary()}", stacklevel=2)
            if not self.repeat:
                return
            self.epoch += 1

    @abc.abstractmethod
    def make_sample(self, where: str, rec: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """One sample from one record (raises :class:`DataError` on broken input)."""

    # -- field helpers ----------------------------------------------------------------------------------------

    @staticmethod
    def _image(where: str, rec: dict[str, Any]):
        try:
            if "image_file" in rec:
                return load_image(rec["image_file"], where=str(rec["image_file"]))
            for ext in IMAGE_EXTS:
                if ext in rec:
                    return load_image(rec[ext], where=f"{where}.{ext}")
        except ImageError as e:
            if e.missing:
                raise DataError(f"{where}: image not found: {rec.get('image_file')}") from None
            raise DataError(f"{where}: cannot read image: {e.reason}") from None
        raise DataError(f"{where}: no image (expected one of {IMAGE_EXTS} or image_path)")

    @staticmethod
    def _json_member(where: str, rec: dict[str, Any]) -> dict[str, Any]:
        """The shard's ``.json`` member as a dict (empty without one); malformed JSON is a :class:`DataError`."""
        if "json" not in rec:
            return {}
        try:
            meta = json.loads(rec["json"])
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise DataError(f"{where}: malformed .json member ({e})") from None
        if not isinstance(meta, dict):
            raise DataError(f"{where}: .json member must hold a JSON object, got {type(meta).__name__}")
        return meta

    @staticmethod
    def _text(where: str, rec: dict[str, Any]) -> str | list[int]:
        if "txt" in rec:
            text = rec["txt"]
            if isinstance(text, str):  # a jsonl record's "txt" key; shard members arrive as bytes
                return text.strip()
            if not isinstance(text, (bytes, bytearray)):
                raise DataError(f"{where}: 'txt' must be a string, got {type(text).__name__}")
            try:
                return text.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: .txt member is not UTF-8 ({e})") from None
        meta = {k: rec[k] for k in TEXT_KEYS if k in rec} or _Stream._json_member(where, rec)
        for k in TEXT_KEYS:
            if meta.get(k) is not None:
                text = meta[k]
                if isinstance(text, str) or (isinstance(text, list) and all(type(t) is int for t in text)):
                    return text
                raise DataError(f"{where}: {k} must be a string or a list of token ids, got {type(text).__name__}")
        raise DataError(f"{where}: no text (expected a .txt member or one of {TEXT_KEYS})")

    @staticmethod
    def _visual_tokens(where: str, rec: dict[str, Any]) -> torch.Tensor | None:
        if "visual_tokens.npy" in rec:
            try:
                return torch.from_numpy(np.load(io.BytesIO(rec["visual_tokens.npy"])).astype(np.int64)).flatten()
            except Exception as e:
                raise DataError(f"{where}: bad visual_tokens.npy: {e}") from e
        vt = rec["visual_tokens"] if "visual_tokens" in rec else _Stream._json_member(where, rec).get("visual_tokens")
        if vt is None:
            return None
        try:
            arr = np.asarray(vt)
        except ValueError:  # ragged nesting
            arr = np.asarray(None)
        if arr.dtype.kind not in "iu" or arr.size == 0:
            raise DataError(f"{where}: visual_tokens must be a non-empty (nested) list of ints, got {str(vt)[:40]}")
        return torch.from_numpy(arr.astype(np.int64)).flatten()

    @staticmethod
    def _apply(transform: Callable | None, img) -> dict[str, torch.Tensor]:
        if transform is None:
            from torchvision.transforms.v2.functional import pil_to_tensor

            return {"image": pil_to_tensor(img).float().div_(255)}
        out = transform(img)
        if isinstance(out, tuple):  # PretrainTransform with a tokenizer view
            return {"image": out[0], "tokenizer_image": out[1]}
        return {"image": out}


def _encode(tokenizer: Any, where: str, text: str | list[int], max_len: int) -> dict[str, torch.Tensor]:
    if isinstance(text, str) and not text.strip():
        raise DataError(f"{where}: empty text")
    ids, pad = tokenizer.encode(text, max_len)
    return {"language_tokens": torch.tensor(ids, dtype=torch.long), "padding_mask": torch.tensor(pad, dtype=torch.long)}


class ImageStream(_Stream):
    """Images -> {image (3,S,S)[, tokenizer_image][, visual_tokens (N,)], key}.

    Args:
        source: tar shards, an image folder, or jsonl with ``image_path``.
        transform: PIL -> tensor, or -> (image, tokenizer_image) such as
            :class:`~multiway.data.transforms.PretrainTransform`. Default: to a [0, 1] tensor.
    """

    def __init__(self, source, transform: Callable | None = None, **kwargs) -> None:
        super().__init__(source, **kwargs)
        self.transform = transform

    def make_sample(self, where, rec, rng):
        sample = self._apply(self.transform, self._image(where, rec))
        vt = self._visual_tokens(where, rec)
        if vt is not None:
            sample["visual_tokens"] = vt
        return sample


class TextStream(_Stream):
    """Texts -> {language_tokens (T,), padding_mask (T,), key}, encoded ``[<s>] ids [</s>] <pad>...``.

    Args:
        source: ``.txt`` files (one text per line), jsonl with ``text``, or tar shards with ``.txt`` members.
        tokenizer: a :class:`~multiway.tokenizers.TextTokenizer`.
        max_len: length with specials.
    """

    def __init__(self, source, tokenizer: Any, max_len: int = 128, **kwargs) -> None:
        super().__init__(source, **kwargs)
        self.tokenizer, self.max_len = tokenizer, max_len

    def make_sample(self, where, rec, rng):
        return _encode(self.tokenizer, where, self._text(where, rec), self.max_len)


class PairStream(_Stream):
    """Image-text pairs -> {image[, tokenizer_image][, visual_tokens], language_tokens, padding_mask, key}.

    Args:
        source: tar shards with an image and a ``.txt``, or jsonl with ``image_path`` and a text field
            (``text``/``caption``, or ``text_segment`` as a string or token ids — the official indexes work).
    """

    def __init__(self, source, transform: Callable | None, tokenizer: Any, max_len: int = 64, **kwargs) -> None:
        super().__init__(source, **kwargs)
        self.transform, self.tokenizer, self.max_len = transform, tokenizer, max_len

    def make_sample(self, where, rec, rng):
        text = self._text(where, rec)
        sample = self._apply(self.transform, self._image(where, rec))
        sample.update(_encode(self.tokenizer, where, text, self.max_len))
        vt = self._visual_tokens(where, rec)
        if vt is not None:
            sample["visual_tokens"] = vt
        return sample
