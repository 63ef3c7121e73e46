"""Dense-task data in the official formats, with every annotation checked under the skip policy.

* :class:`CocoInstances` — a COCO ``instances_*.json`` (read by pycocotools) and its images: boxes, polygons,
  RLE (compressed or not) and ``iscrowd``; items are torchvision detection targets.
* :class:`ADE20KDataset` — the ADE20K layout ``images/<split>/*.jpg`` + ``annotations/<split>/*.png`` (one class
  id per pixel, 0 = "other"), with ``reduce_zero_label``.
* :func:`read_conll` — CoNLL-2003 columns (``word POS chunk NER``, a blank line between sentences, ``-DOCSTART-``
  lines ignored) and :func:`align_labels` (word tags -> the first subword of each word, ``-100`` elsewhere).

Broken annotations follow ``on_error`` (:mod:`multiway.data.io`): ``"raise"`` (default) raises a
:class:`~multiway.data.io.DataError` naming the file and entry; ``"skip"`` drops the entry (an annotation, an
image, a sentence) and counts it in ``dataset.errors``. Checked: a box outside the image or with no area, a mask
whose size differs from its image, a category id not in ``categories``, an image or PNG that cannot be read, a
label PNG whose size differs from its image, a tag not in the tag set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..constants import BOS_ID, EOS_ID, PAD_ID
from ..data.io import DataError, DataErrors, ImageError, load_image
from .segmentation import IGNORE_INDEX, reduce_zero_label

# A box may overhang its image by this many pixels (COCO's own boxes are float and sometimes end at W + 0.5).
BOX_TOLERANCE = 1.0
IGNORE_LABEL = -100


def _image_tensor(img) -> Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1] (the detector normalises it)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


class CocoInstances(Dataset):
    """COCO instances: items ``{"image": (3, H, W) float in [0, 1], "target": {...}, "image_id": int}``.

    ``target`` holds ``boxes`` (N, 4) xyxy float, ``labels`` (N,) long in 1..K (K = number of categories, in the
    order of ``categories`` ids), ``masks`` (N, H, W) uint8, ``iscrowd`` (N,); crowd regions are left out of the
    training targets (torchvision's losses have no crowd notion) and kept by :attr:`coco` for evaluation.

    Args:
        annotation_file: the instances json.
        image_dir: the folder its ``file_name``s are relative to.
        transform: ``(image, target) -> (image, target)`` on tv_tensors (e.g. large-scale jitter), or None.
        masks: build the instance masks (Mask R-CNN); False for boxes only.
        on_error: the skip policy (module docstring).
    """

    def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike, transform: Callable | None = None,
                 masks: bool = True, on_error: str = "raise"):
        import contextlib
        import io

        from pycocotools.coco import COCO

        self.file, self.image_dir = Path(annotation_file), Path(image_dir)
        if not self.file.is_file():
            raise DataError(f"{self.file}: COCO annotation file not found")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            try:
                self.coco = COCO(str(self.file))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{self.file}: not a COCO instances json ({type(e).__name__}: {e})") from None
        self.transform, self.masks = transform, masks
        self.errors = DataErrors(on_error)
        self.category_ids = sorted(self.coco.cats)
        self.label_of = {cat: i + 1 for i, cat in enumerate(self.category_ids)}
        self.names = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.annotations: dict[int, list[dict[str, Any]]] = {}
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            good = [a for a in self.coco.imgToAnns.get(image_id, []) if self._check(a, info)]
            self.annotations[image_id] = good
        self.image_ids = list(self.annotations)

    def _check(self, ann: dict[str, Any], info: dict[str, Any]) -> bool:
        """Whether an annotation is usable; a broken one raises or is counted (the skip policy)."""
        where = f"{self.file}: annotation id {ann.get('id')} (image {info['id']}, {info.get('file_name')})"
        width, height = info.get("width"), info.get("height")
        if ann.get("category_id") not in self.coco.cats:
            self.errors.handle(where, f"category_id {ann.get('category_id')} is not in categories (ids {self.category_ids})")
            return False
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4):
            self.errors.handle(where, f"bbox must be [x, y, w, h], got {box!r}")
            return False
        x, y, w, h = box
        if w <= 0 or h <= 0:
            self.errors.handle(where, f"bbox {box} has no area")
            return False
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
            self.errors.handle(where, f"bbox {box} (x, y, w, h) lies outside the {width}x{height} image")
            return False
        seg = ann.get("segmentation")
        if self.masks and isinstance(seg, dict):
            size = seg.get("size")
            if list(size or ()) != [height, width]:
                self.errors.handle(where, f"RLE mask size {size} differs from the image's [height, width] = [{height}, {width}]")
                return False
        elif self.masks and not (isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 for p in seg)):
            self.errors.handle(where, f"segmentation must be polygons (lists of >= 3 x, y pairs) or an RLE dict, got {seg!r:.80}")
            return False
        return True

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        from torchvision import tv_tensors

        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            img = load_image(path)
        except ImageError as e:
            return self._skip(f"{self.file}: image {image_id} ({info['file_name']}): {e.reason}")
        if img.size != (info["width"], info["height"]):
            return self._skip(f"{self.file}: image {image_id} ({info['file_name']}) is {img.size[0]}x{img.size[1]} but the json "
                              f"says {info['width']}x{info['height']}")
        anns = [a for a in self.annotations[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        size = (info["height"], info["width"])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clamp(min=0), format="XYXY", canvas_size=size),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.long),
        }
        if self.masks:
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, *size), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        image = tv_tensors.Image(_image_tensor(img))
        if self.transform is not None:
            image, target = self.transform(image, target)
        target["boxes"] = target["boxes"].as_subclass(Tensor)
        if "masks" in target:
            target["masks"] = target["masks"].as_subclass(Tensor)
        return {"image": image.as_subclass(Tensor), "target": target, "image_id": image_id}

    def _skip(self, msg: str) -> dict[str, str]:
        if self.errors.on_error == "raise":
            raise DataError(msg)
        return {"_skipped": msg}


def collate_detection(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Detection batches are lists (images differ in size): ``{"images": [...], "targets": [...], "image_ids": [...]}``;
    skipped items are listed under ``"skipped"``."""
    kept = [i for i in items if i is not None and "_skipped" not in i]
    skipped = [i["_skipped"] for i in items if i is not None and "_skipped" in i]
    return {"images": [i["image"] for i in kept], "targets": [i["target"] for i in kept], "image_ids": [i["image_id"] for i in kept],
            "batch_size": len(kept), "skipped": skipped}


ADE_SPLITS = {"train": "training", "val": "validation", "test": "validation"}


class ADE20KDataset(Dataset):
    """The ADE20K folders: ``root/images/<training|validation>/X.jpg`` and ``root/annotations/<...>/X.png``.

    Items ``{"image": (3, S, S), "label": (S, S) long}`` with ``IGNORE_INDEX`` (255) on ignored pixels.

    Args:
        root: the folder holding ``images/`` and ``annotations/``.
        split: ``train`` / ``val`` (folder ``training`` / ``validation``).
        transform: ``(image tv_tensors.Image, label tv_tensors.Mask) -> (image, label)``, or None.
        reduce_zero_label: ADE20K's convention (0 = "other" ignored, classes shift down by one).
        on_error: the skip policy; a missing label PNG or one that does not match its image is an error.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None, reduce_zero_label: bool = True,
                 on_error: str = "raise"):
        if split not in ADE_SPLITS:
            raise KeyError(f"ADE20K has no split {split!r}; splits: {', '.join(ADE_SPLITS)}")
        self.root = Path(root)
        self.image_dir = self.root / "images" / ADE_SPLITS[split]
        self.label_dir = self.root / "annotations" / ADE_SPLITS[split]
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: ADE20K image folder not found (expected images/{ADE_SPLITS[split]}/ under {self.root})")
        self.transform, self.reduce_zero_label = transform, reduce_zero_label
        self.errors = DataErrors(on_error)
        self.pairs: list[tuple[Path, Path]] = []
        for image in sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
            label = self.label_dir / f"{image.stem}.png"
            if not label.is_file():
                self.errors.handle(str(image), f"no label PNG {label}")
                continue
            self.pairs.append((image, label))

    def __len__(self) -> int:
        return len(self.pairs)

    def read_label(self, path: Path) -> np.ndarray:
        """A label PNG as (H, W) int64 class ids (after ``reduce_zero_label`` when set)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise DataError(f"{path}: label PNG must hold one class id per pixel (mode L or P), got mode {im.mode}")
                label = np.asarray(im, dtype=np.int64)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: cannot read the label PNG ({type(e).__name__}: {e})") from None
        return reduce_zero_label(label) if self.reduce_zero_label else label

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision import tv_tensors

        image_path, label_path = self.pairs[index]
        try:
            img = load_image(image_path)
            label = self.read_label(label_path)
            if label.shape != (img.size[1], img.size[0]):
                raise DataError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image {image_path.name} is "
                                f"{img.size[0]}x{img.size[1]}")
        except DataError as e:
            if self.errors.on_error == "raise":
                raise
            return {"_skipped": str(e)}
        image, mask = tv_tensors.Image(_image_tensor(img)), tv_tensors.Mask(torch.from_numpy(label))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": image.as_subclass(Tensor), "label": mask.as_subclass(Tensor).long()}

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Pixels per class over the split (labels only; for the chance baseline)."""
        counts = np.zeros(num_classes, np.int64)
        for _, label_path in self.pairs:
            label = self.read_label(label_path)
            counts += np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]
        return counts


def read_conll(path: str | os.PathLike, tags: Sequence[str] | None = None, column: int = -1,
               errors: DataErrors | None = None) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL file: ``[(words, tags), ...]``; words in the first column, tags in ``column``.

    Blank lines end sentences, ``-DOCSTART-`` lines are skipped. A tag not in ``tags`` (when given) or a line with
    too few columns is an error naming ``file:line``, or (``errors`` with ``on_error="skip"``) drops its sentence.
    """
    errors = errors or DataErrors("raise")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CoNLL file not found")
    allowed = set(tags) if tags is not None else None
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    labels: list[str] = []
    broken = False

    def flush() -> None:
        nonlocal words, labels, broken
        if words and not broken:
            sentences.append((words, labels))
        words, labels, broken = [], [], False

    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                flush()
                continue
            if fields[0] == "-DOCSTART-":
                continue
            if len(fields) < 2 or not -len(fields) <= column < len(fields) or column == 0:
                errors.handle(f"{path}:{number}", f"expected a word and a tag column {column}, got {line.strip()!r}")
                broken = True
                continue
            tag = fields[column]
            if allowed is not None and tag not in allowed:
                errors.handle(f"{path}:{number}", f"tag {tag!r} is not in the tag set {sorted(allowed)}")
                broken = True
                continue
            words.append(fields[0])
            labels.append(tag)
    flush()
    return sentences


def align_labels(words: Sequence[str], tags: Sequence[str], tokenizer: Any, tag_ids: dict[str, int], max_len: int
                 ) -> tuple[list[int], list[int], list[int], list[int]]:
    """Word tags -> subword labels: each word is tokenized on its own; its first subword carries its tag id, the
    others and the specials ``IGNORE_LABEL`` (-100).

    Returns (ids (T,), padding_mask (T,), labels (T,), word_of (T,): the word index of each first subword, -1
    elsewhere), T = ``max_len`` with ``<s>``/``</s>``; words past the length are cut (their tags are then unscored
    by the loss and predicted as ``O`` by :func:`word_predictions`).
    """
    ids, labels, word_of = [BOS_ID], [IGNORE_LABEL], [-1]
    for index, (word, tag) in enumerate(zip(words, tags)):
        pieces = tokenizer.text_to_ids(word) or [tokenizer.unk_id]
        if len(ids) + len(pieces) > max_len - 1:
            break
        ids += pieces
        labels += [tag_ids[tag]] + [IGNORE_LABEL] * (len(pieces) - 1)
        word_of += [index] + [-1] * (len(pieces) - 1)
    ids.append(EOS_ID)
    labels.append(IGNORE_LABEL)
    word_of.append(-1)
    n = len(ids)
    pad = max_len - n
    return ids + [PAD_ID] * pad, [0] * n + [1] * pad, labels + [IGNORE_LABEL] * pad, word_of + [-1] * pad


def word_predictions(logits: Tensor, word_of: Tensor, num_words: Sequence[int], names: Sequence[str],
                     outside: str = "O") -> list[list[str]]:
    """Per-word tag names from subword logits (B, T, K): the tag of each word's first subword; cut words get ``outside``."""
    best = logits.argmax(-1).tolist()
    out = []
    for row, words, n in zip(best, word_of.tolist(), num_words):
        tags = [outside] * n
        for tag, word in zip(row, words):
            if word >= 0:
                tags[word] = names[tag]
        out.append(tags)
    return out


class ConllDataset(Dataset):
    """CoNLL sentences as token-classification items ``{language_tokens, padding_mask, labels, word_of, num_words}``."""

    def __init__(self, path: str | os.PathLike, tokenizer: Any, tag_names: Sequence[str] | None = None, column: int = -1,
                 max_len: int = 64, on_error: str = "raise"):
        self.errors = DataErrors(on_error)
        self.sentences = read_conll(path, tag_names, column, self.errors)
        if tag_names is None:
            tag_names = sorted({t for _, tags in self.sentences for t in tags})
        self.tag_names = list(tag_names)
        self.tag_ids = {t: i for i, t in enumerate(self.tag_names)}
        self.tokenizer, self.max_len = tokenizer, max_len

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> dict[str, Any]:
        words, tags = self.sentences[index]
        ids, pad, labels, word_of = align_labels(words, tags, self.tokenizer, self.tag_ids, self.max_len)
        return {"language_tokens": torch.tensor(ids), "padding_mask": torch.tensor(pad), "labels": torch.tensor(labels),
                "word_of": torch.tensor(word_of), "num_words": len(words)}


__all__ = [
    "ADE20KDataset", "BOX_TOLERANCE", "CocoInstances", "ConllDataset", "IGNORE_LABEL", "align_labels", "collate_detection",
    "read_conll", "word_predictions",
]
