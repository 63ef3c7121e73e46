"""The base of the datasets that read the official BEiT-3 jsonl indexes (§5), and their batch collation.

Every task reads JSON-lines index files under ``data_dir`` (names: :data:`multiway.constants.INDEX_FILES`);
image paths in them are relative to ``data_dir``; ``text_segment`` holds token ids without specials (or a raw
string, tokenized here). A task's dataset (in its module of :mod:`multiway.downstream.tasks`) subclasses
:class:`IndexDataset` with the fields it requires and how one item becomes a sample; :func:`collate_batch` stacks
samples into a batch. Broken input follows the ``on_error`` policy of :mod:`multiway.data.io`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiway.constants import BOS_ID, EOS_ID, PAD_ID
from multiway.data.io import DataError, DataErrors, ImageError, load_image, read_jsonl


def encode_text(segment: str | Sequence[int], tokenizer: Any, max_len: int) -> tuple[list[int], list[int]]:
    """``[<s>] ids [</s>]`` padded with ``<pad>`` to ``max_len``: (ids (T,), padding_mask (T,), 1 = pad)."""
    if isinstance(segment, str):
        if tokenizer is None:
            raise ValueError("the text is a string but no tokenizer was given (--tokenizer)")
        ids = tokenizer.text_to_ids(segment)
    else:
        ids = [int(i) for i in segment]
    ids = [BOS_ID] + ids[: max_len - 2] + [EOS_ID]
    n = len(ids)
    return ids + [PAD_ID] * (max_len - n), [0] * n + [1] * (max_len - n)


class IndexDataset(torch.utils.data.Dataset, abc.ABC):
    """Base class: one item per index line, images relative to ``data_dir``, text as token ids.

    Args:
        data_dir: the folder holding the index files and (relative to it) the images.
        split: the split's name (``train``/``val``/``test``...), kept for evaluation outputs.
        index: the index file names of the split, relative to ``data_dir``; read in order.
        transform: PIL image -> (3, S, S) tensor.
        tokenizer: a :class:`~multiway.tokenizers.TextTokenizer`; needed only for raw-string text segments.
        max_len: text length T with specials (official ``num_max_bpe_tokens``, default 64).
        on_error: ``"raise"`` or ``"skip"`` (see :mod:`multiway.data.io`): bad index lines are dropped when the
            dataset is built (``dataset.errors``); a bad image makes ``__getitem__`` return ``{"_skipped": msg}``,
            which :func:`collate_batch` drops and lists under ``batch["skipped"]``.
    """

    #: fields every index line must have
    required: tuple[str, ...] = ("image_path",)

    def __init__(self, data_dir: str | os.PathLike, split: str, index: Sequence[str], transform: Callable | None,
                 tokenizer: Any = None, max_len: int = 64, on_error: str = "raise") -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.errors = DataErrors(on_error)
        self.transform = transform
        self.items: list[dict[str, Any]] = []
        for name in index:
            self.items.extend(read_jsonl(self.data_dir / name, self.errors, self.required))

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, rel: str, item: dict[str, Any]) -> torch.Tensor:
        path = self.data_dir / rel
        try:
            img = load_image(path)
        except ImageError as e:
            if e.missing:
                raise DataError(f"{item['_where']}: image not found: {path}") from None
            raise DataError(f"{item['_where']}: cannot read image {path}: {e.reason}") from None
        if self.transform is None:
            raise DataError(f"{item['_where']}: this dataset was built without an image transform")
        return self.transform(img)

    def _text(self, item: dict[str, Any]) -> tuple[list[int], list[int], int]:
        """(ids (T,), padding_mask (T,), number of real tokens) of the item's ``text_segment``."""
        seg = item["text_segment"]
        if isinstance(seg, str):
            if self.tokenizer is None:
                raise DataError(f"{item['_where']}: text_segment is a string; pass tokenizer= to tokenize it")
            seg = self.tokenizer.text_to_ids(seg)
        elif not isinstance(seg, list) or not all(isinstance(t, int) for t in seg):
            raise DataError(f"{item['_where']}: text_segment must be a list of token ids or a string")
        if not seg:
            raise DataError(f"{item['_where']}: empty text_segment")
        ids = [BOS_ID] + seg[: self.max_len - 2] + [EOS_ID]
        n = len(ids)
        return ids + [PAD_ID] * (self.max_len - n), [0] * n + [1] * (self.max_len - n), n

    @abc.abstractmethod
    def load(self, item: dict[str, Any], index: int) -> dict[str, Any]:
        """The sample of one index item (raises :class:`DataError` on broken input)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            return self.load(item, index)
        except DataError as e:
            if self.errors.on_error == "raise":
                raise
            return {"_skipped": str(e)}


def collate_batch(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack samples key by key: tensors are stacked, ints/lists of ints become long tensors, floats and lists
    of floats float tensors, anything else stays a list. Skipped samples are dropped and reported as
    ``batch["skipped"]`` (messages); ``batch["batch_size"]`` is the number of samples kept."""
    kept = [s for s in samples if s is not None and "_skipped" not in s]
    skipped = [s["_skipped"] for s in samples if s is not None and "_skipped" in s]
    batch: dict[str, Any] = {"batch_size": len(kept)}
    if skipped:
        batch["skipped"] = skipped
    if not kept:
        return batch
    for key in kept[0]:
        values = [s[key] for s in kept]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
            continue
        # The dtype comes from every value, not the first: [1, 0.5] or a score list [1, 0.3] must stay floats.
        rows = [v if isinstance(v, list) else [v] for v in values]
        flat = [x for row in rows for x in row]
        numbers = flat and all(isinstance(x, (int, float, np.integer, np.floating)) for x in flat)
        if not numbers or (isinstance(values[0], list) and not values[0]):
            batch[key] = values
            continue
        if isinstance(values[0], list) and len({len(r) for r in rows}) > 1:
            raise ValueError(f"collate_batch: key {key!r} holds lists of different lengths {sorted({len(r) for r in rows})}")
        integral = all(isinstance(x, (int, np.integer)) for x in flat)  # bool is an int
        batch[key] = torch.tensor(values, dtype=torch.long if integral else torch.float32)
    return batch


__all__ = ["IndexDataset", "collate_batch", "encode_text"]
