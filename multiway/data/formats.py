"""The datasets of the official BEiT-3 jsonl indexes (§5) and their batch collation.

Every task reads JSON-lines index files under ``data_dir`` (names: :data:`multiway.constants.INDEX_FILES`);
image paths in them are relative to ``data_dir``; ``text_segment`` holds token ids without specials (or a raw
string, tokenized here). The datasets return dicts with the official batch keys, and :func:`collate_batch` stacks
them. Broken input follows the ``on_error`` policy of :mod:`multiway.data.io`.
"""

from __future__ import annotations

import abc
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiway.constants import BOS_ID, EOS_ID, PAD_ID, VQA_ANSWER_FILE
from multiway.data.io import DataError, DataErrors, ImageError, index_files, load_image, read_jsonl
from multiway.data.masking import mask_captioning
from multiway.data.raw_indexes import read_answer2label

VQA_NUM_LABELS = 3129  # the official head size


# ----------------------------------------------------------------------------------------------------------------
# datasets

class IndexDataset(torch.utils.data.Dataset, abc.ABC):
    """Base class: one item per index line, images relative to ``data_dir``, text as token ids.

    Args:
        data_dir: the folder holding the index files and (relative to it) the images.
        split: ``train``/``val``/``test`` (and ``test-dev`` for vqav2).
        transform: PIL image -> (3, S, S) tensor. Default: :func:`build_transform` of the task and split.
        tokenizer: a :class:`~multiway.tokenizers.TextTokenizer`; needed only for raw-string text segments.
        max_len: text length with specials (official ``num_max_bpe_tokens``, default 64).
        on_error: ``"raise"`` or ``"skip"`` (see the module docstring).
        index: explicit index file names instead of the official ones for ``split``.
    """

    task = ""
    required: tuple[str, ...] = ("image_path",)

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 tokenizer: Any = None, max_len: int = 64, img_size: int = 224, on_error: str = "raise",
                 index: Sequence[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.errors = DataErrors(on_error)
        if transform is None:
            from multiway.data.transforms import build_transform

            transform = build_transform(self.task, is_train=split == "train", img_size=img_size)
        self.transform = transform
        self.items: list[dict[str, Any]] = []
        for name in index or index_files(self.task, split):
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
        return self.transform(img)

    def _text(self, item: dict[str, Any]) -> tuple[list[int], list[int], int]:
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

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        try:
            return self.load(item, index)
        except DataError as e:
            if self.errors.on_error == "raise":
                raise
            return {"_skipped": str(e)}


class ImageNetDataset(IndexDataset):
    """``imagenet.{train,val}.index.jsonl`` -> {image (3,S,S), label int}."""

    task = "imagenet"
    required = ("image_path", "label")

    def load(self, item, index):
        return {"image": self._image(item["image_path"], item), "label": int(item["label"])}


class NLVR2Dataset(IndexDataset):
    """``nlvr2.{train,dev,test-P}.index.jsonl`` -> {image, image2, language_tokens (T,), padding_mask (T,), label}."""

    task = "nlvr2"
    required = ("image_path", "image2_path", "text_segment", "label")

    def load(self, item, index):
        ids, pad, _ = self._text(item)
        return {"image": self._image(item["image_path"], item), "image2": self._image(item["image2_path"], item),
                "language_tokens": ids, "padding_mask": pad, "label": int(item["label"])}


class VQAv2Dataset(IndexDataset):
    """``vqa.*.jsonl`` + ``answer2label.txt``.

    Yields {image, language_tokens, padding_mask, qid} plus ``labels`` (float[num_labels] soft scores) when the
    item has labels (train/val; the official test files have none).
    """

    task = "vqav2"
    required = ("image_path", "text_segment", "qid")

    def __init__(self, data_dir, split="train", *args, num_labels: int | None = None, **kwargs) -> None:
        super().__init__(data_dir, split, *args, **kwargs)
        a2l = Path(data_dir) / VQA_ANSWER_FILE
        self.answer2label = read_answer2label(a2l) if a2l.is_file() else {}
        self.label2answer = {v: k for k, v in self.answer2label.items()}
        self.num_labels = num_labels or (len(self.answer2label) or VQA_NUM_LABELS)

    def load(self, item, index):
        ids, pad, _ = self._text(item)
        out = {"image": self._image(item["image_path"], item), "language_tokens": ids, "padding_mask": pad,
               "qid": int(item["qid"])}
        if item.get("labels") is not None:
            target = [0.0] * self.num_labels
            for label, score in zip(item["labels"], item["scores"]):
                if not 0 <= label < self.num_labels:
                    raise DataError(f"{item['_where']}: label {label} outside [0, {self.num_labels})")
                target[label] = float(score)
            out["labels"] = target
        return out


class RetrievalDataset(IndexDataset):
    """``{coco_retrieval,flickr30k}.{split}.jsonl`` -> {image, language_tokens, padding_mask, image_id}.

    ``image_id`` is the running image index within the split (one item per caption).
    """

    task = "coco_retrieval"
    required = ("image_path", "text_segment", "image_id")

    def __init__(self, data_dir, split="train", *args, task: str = "coco_retrieval", **kwargs) -> None:
        if task not in ("coco_retrieval", "flickr30k"):
            raise ValueError(f"retrieval task must be coco_retrieval or flickr30k, got {task!r}")
        self.task = task
        super().__init__(data_dir, split, *args, **kwargs)

    def load(self, item, index):
        ids, pad, _ = self._text(item)
        return {"image": self._image(item["image_path"], item), "language_tokens": ids, "padding_mask": pad,
                "image_id": int(item["image_id"])}


class CaptioningDataset(IndexDataset):
    """``coco_captioning.*.jsonl`` / ``nocaps.*.jsonl``.

    Training items (with text) -> {image, image_id, language_tokens, masked_tokens, language_masked_pos,
    padding_mask}, masked as the official captioning recipe (§2.5; needs ``tokenizer`` for ``<mask>`` and the
    vocabulary size, or ``mask_id``/``vocab_size``). Eval items (``text_segment: null``) -> {image, image_id}.
    """

    task = "coco_captioning"
    required = ("image_path", "image_id")

    def __init__(self, data_dir, split="train", *args, task: str = "coco_captioning", mask_prob: float = 0.6,
                 mask_id: int | None = None, vocab_size: int | None = None, seed: int | None = None,
                 **kwargs) -> None:
        if task not in ("coco_captioning", "nocaps"):
            raise ValueError(f"captioning task must be coco_captioning or nocaps, got {task!r}")
        self.task = task
        super().__init__(data_dir, split, *args, **kwargs)
        tok = self.tokenizer
        self.mask_prob = mask_prob
        self.mask_id = mask_id if mask_id is not None else (tok.mask_id if tok is not None else None)
        self.vocab_size = vocab_size if vocab_size is not None else (tok.vocab_size if tok is not None else None)
        self.seed = seed

    def load(self, item, index):
        out = {"image": self._image(item["image_path"], item), "image_id": item["image_id"]}
        if item.get("text_segment") is None:
            return out
        if self.mask_id is None or self.vocab_size is None:
            raise DataError(f"{item['_where']}: captioning training needs tokenizer= (or mask_id= and vocab_size=)")
        ids, pad, n = self._text(item)
        # seed given: the same mask for an item every epoch; else fresh masks drawn from torch's RNG, which the
        # training loop seeds (and DataLoader workers derive from it), so a seeded run is reproducible
        rng = random.Random(int(torch.randint(2**62, ())) if self.seed is None else self.seed * 1_000_003 + index)
        masked, pos = mask_captioning(ids, n, self.mask_prob, self.mask_id, self.vocab_size, rng)
        out.update(language_tokens=ids, masked_tokens=masked, language_masked_pos=pos, padding_mask=pad)
        return out


DATASETS: dict[str, type[IndexDataset]] = {
    "imagenet": ImageNetDataset, "nlvr2": NLVR2Dataset, "vqav2": VQAv2Dataset,
    "coco_retrieval": RetrievalDataset, "flickr30k": RetrievalDataset,
    "coco_captioning": CaptioningDataset, "nocaps": CaptioningDataset,
}


def create_dataset(task: str, data_dir: str | os.PathLike, split: str = "train", **kwargs: Any) -> IndexDataset:
    """The dataset of an official task (``imagenet``, ``nlvr2``, ``vqav2``, ``coco_retrieval``, ``flickr30k``,
    ``coco_captioning``, ``nocaps``); ``kwargs`` go to :class:`IndexDataset`."""
    if task not in DATASETS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(DATASETS)}")
    if task in ("coco_retrieval", "flickr30k", "coco_captioning", "nocaps"):
        kwargs["task"] = task
    return DATASETS[task](data_dir, split, **kwargs)


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
        v = values[0]
        if isinstance(v, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(v, bool) or isinstance(v, (int, np.integer)):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(v, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        elif isinstance(v, list) and v and isinstance(v[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        elif isinstance(v, list) and v and isinstance(v[0], (int, bool)):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch
