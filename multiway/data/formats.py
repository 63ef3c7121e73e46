"""Readers and builders of the official BEiT-3 jsonl indexes (§5).

Every task reads JSON-lines index files under ``data_dir``; image paths in them are relative to ``data_dir``;
``text_segment`` holds token ids without specials (or a raw string, tokenized here). The datasets return dicts
with the official batch keys, and :func:`collate_batch` stacks them.

Broken input policy (``on_error``):

* ``"raise"`` (default): a :class:`DataError` naming the file, the line and what was expected;
* ``"skip"``: the bad line or sample is skipped and counted in a :class:`DataErrors`. Bad index lines are
  dropped when the dataset is built (``dataset.errors``); a bad image found while loading makes
  ``__getitem__`` return ``None``, which :func:`collate_batch` drops and lists under ``batch["skipped"]``
  (so it is reported from dataloader workers too); ``errors.absorb(batch)`` counts those.
"""

from __future__ import annotations

import abc
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiway.data.masking import mask_captioning
from multiway.downstream.metrics import normalize_vqa_answer, vqa_soft_score

BOS_ID, PAD_ID, EOS_ID = 0, 1, 2
VQA_NUM_LABELS = 3129  # the official head size


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


# ----------------------------------------------------------------------------------------------------------------
# datasets

INDEX_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "imagenet": {"train": ("imagenet.train.index.jsonl",), "val": ("imagenet.val.index.jsonl",),
                 "test": ("imagenet.val.index.jsonl",)},
    "nlvr2": {"train": ("nlvr2.train.index.jsonl",), "val": ("nlvr2.dev.index.jsonl",),
              "test": ("nlvr2.test-P.index.jsonl",)},
    "vqav2": {"train": ("vqa.train.jsonl", "vqa.trainable_val.jsonl"), "val": ("vqa.rest_val.jsonl",),
              "test": ("vqa.test.jsonl",), "test-dev": ("vqa.test-dev.jsonl",)},
    "coco_retrieval": {s: (f"coco_retrieval.{s}.jsonl",) for s in ("train", "val", "test")},
    "flickr30k": {s: (f"flickr30k.{s}.jsonl",) for s in ("train", "val", "test")},
    "coco_captioning": {"train": ("coco_captioning.train.jsonl",), "val": ("coco_captioning.val.jsonl",),
                        "test": ("coco_captioning.test.jsonl",)},
    "nocaps": {"train": ("coco_captioning.train.jsonl",), "val": ("nocaps.val.jsonl",),
               "test": ("nocaps.test.jsonl",)},
}


def index_files(task: str, split: str) -> tuple[str, ...]:
    """The official index file names of a task's split (§5)."""
    if task not in INDEX_FILES:
        raise KeyError(f"unknown task {task!r}; known: {sorted(INDEX_FILES)}")
    if split not in INDEX_FILES[task]:
        raise KeyError(f"task {task!r} has no split {split!r}; known: {sorted(INDEX_FILES[task])}")
    return INDEX_FILES[task][split]


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
        except FileNotFoundError:
            raise DataError(f"{item['_where']}: image not found: {path}") from None
        except Exception as e:  # PIL raises several types for corrupt or truncated files
            raise DataError(f"{item['_where']}: cannot read image {path}: {type(e).__name__}: {e}") from e
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
        a2l = Path(data_dir) / "answer2label.txt"
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


# ----------------------------------------------------------------------------------------------------------------
# index builders from the raw public files


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.text_to_ids(text)


def read_answer2label(path: str | os.PathLike) -> dict[str, int]:
    """``answer2label.txt`` (JSON lines ``{"answer", "label"}``) -> {answer: label}."""
    errors = DataErrors("raise")
    return {it["answer"]: int(it["label"]) for it in read_jsonl(path, errors, ("answer", "label"))}


def build_karpathy_retrieval_index(data_dir: str | os.PathLike, tokenizer: Any, karpathy_json: str | os.PathLike,
                                   task: str = "coco_retrieval", image_root: str | None = None) -> dict[str, int]:
    """``{task}.{train,val,test}.jsonl`` from a Karpathy split file (``dataset_coco.json`` /
    ``dataset_flickr30k.json``): one item per caption, ``image_id`` = running image index within the split.
    COCO trains on ``train+restval``. Image paths are ``<filepath>/<filename>`` (COCO) or
    ``<image_root or flickr30k-images>/<filename>`` (Flickr). Returns {file: item count}."""
    data = json.loads(Path(karpathy_json).read_text())
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    next_id = {"train": 0, "val": 0, "test": 0}
    for img in data["images"]:
        split = "train" if img["split"] in ("train", "restval") else img["split"]
        if split not in splits:
            continue
        path = _karpathy_path(img, task, image_root)
        for sent in img["sentences"]:
            splits[split].append({"image_path": path, "text_segment": _ids(tokenizer, sent["raw"]),
                                  "image_id": next_id[split]})
        next_id[split] += 1
    return {f"{task}.{s}.jsonl": write_jsonl(Path(data_dir) / f"{task}.{s}.jsonl", items)
            for s, items in splits.items()}


def _karpathy_path(img: Mapping[str, Any], task: str, image_root: str | None) -> str:
    if image_root is not None:
        return f"{image_root}/{img['filename']}"
    if "filepath" in img:
        return f"{img['filepath']}/{img['filename']}"
    return f"{'flickr30k-images' if task == 'flickr30k' else '.'}/{img['filename']}"


def build_coco_captioning_index(data_dir: str | os.PathLike, tokenizer: Any, karpathy_json: str | os.PathLike,
                                image_root: str | None = None, write_gt: bool = True) -> dict[str, int]:
    """``coco_captioning.{train,val,test}.jsonl`` from ``dataset_coco.json``: train one item per caption with
    ``image_id = cocoid``; val/test one item per image with ``text_segment: null``. With ``write_gt`` also the
    caption ground truth ``coco_karpathy_{val,test}_gt.json`` (COCO caption format) for the evaluation."""
    data = json.loads(Path(karpathy_json).read_text())
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    gt: dict[str, dict[str, list]] = {s: {"images": [], "annotations": []} for s in ("val", "test")}
    for img in data["images"]:
        split = "train" if img["split"] in ("train", "restval") else img["split"]
        if split not in out:
            continue
        path = _karpathy_path(img, "coco_captioning", image_root)
        cid = img.get("cocoid", img.get("imgid"))
        if split == "train":
            for sent in img["sentences"]:
                out[split].append({"image_path": path, "text_segment": _ids(tokenizer, sent["raw"]), "image_id": cid})
        else:
            out[split].append({"image_path": path, "text_segment": None, "image_id": cid})
            gt[split]["images"].append({"id": cid})
            for sent in img["sentences"]:
                gt[split]["annotations"].append({"image_id": cid, "caption": sent["raw"],
                                                 "id": len(gt[split]["annotations"])})
    counts = {f"coco_captioning.{s}.jsonl": write_jsonl(Path(data_dir) / f"coco_captioning.{s}.jsonl", items)
              for s, items in out.items()}
    if write_gt:
        for s, g in gt.items():
            (Path(data_dir) / f"coco_karpathy_{s}_gt.json").write_text(json.dumps(g))
    return counts


def build_nocaps_index(data_dir: str | os.PathLike, nocaps_json: str | os.PathLike, split: str = "val",
                       image_root: str | None = None) -> dict[str, int]:
    """``nocaps.{val,test}.jsonl`` from the nocaps image-info file (``nocaps_val_image_info.json``):
    ``image_path = "<split>/<file_name>"``, ``image_id = id``, ``text_segment: null``."""
    data = json.loads(Path(nocaps_json).read_text())
    root = image_root or split
    items = [{"image_path": f"{root}/{img['file_name']}", "text_segment": None, "image_id": img["id"]}
             for img in data["images"]]
    return {f"nocaps.{split}.jsonl": write_jsonl(Path(data_dir) / f"nocaps.{split}.jsonl", items)}


def build_vqa_index(data_dir: str | os.PathLike, tokenizer: Any,
                    splits: Mapping[str, Sequence[tuple[str | os.PathLike, str | os.PathLike | None, str]]],
                    min_answer_count: int = 9, vocab_splits: Sequence[str] | None = None) -> dict[str, int]:
    """VQA indexes + ``answer2label.txt`` from VQAv2-format question/annotation files.

    ``splits`` maps an index name (``train`` -> ``vqa.train.jsonl``) to a list of
    ``(questions_json, annotations_json or None, image_path_template)``; the template is formatted with
    ``image_id`` (e.g. ``"train2014/COCO_train2014_{image_id:012d}.jpg"``). The answer vocabulary is
    ``normalize(multiple_choice_answer)`` over the ``vocab_splits`` (default: every split with annotations)
    kept when seen ``>= min_answer_count`` times, most frequent first. Each question's raw annotator answers are
    counted and scored ``min(1, 0.3*count)``; questions without an in-vocabulary answer are dropped from splits
    with annotations. Returns {file: item count}.
    """
    loaded: dict[str, list[tuple[list[dict], dict[int, dict] | None, str]]] = {}
    for name, parts in splits.items():
        loaded[name] = []
        for q_file, a_file, template in parts:
            questions = json.loads(Path(q_file).read_text())["questions"]
            anns = None
            if a_file is not None:
                anns = {a["question_id"]: a for a in json.loads(Path(a_file).read_text())["annotations"]}
            loaded[name].append((questions, anns, template))
    vocab_from = vocab_splits or [n for n, parts in loaded.items() if any(a is not None for _, a, _ in parts)]
    counter: Counter[str] = Counter()
    for name in vocab_from:
        for _, anns, _ in loaded[name]:
            for a in (anns or {}).values():
                counter[normalize_vqa_answer(a["multiple_choice_answer"])] += 1
    answers = [a for a, c in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_answer_count]
    answer2label = {a: i for i, a in enumerate(answers)}
    data_dir = Path(data_dir)
    counts = {"answer2label.txt": write_jsonl(data_dir / "answer2label.txt",
                                              ({"answer": a, "label": i} for a, i in answer2label.items()))}
    for name, parts in loaded.items():
        items = []
        for questions, anns, template in parts:
            for q in questions:
                item = {"image_path": template.format(image_id=q["image_id"]),
                        "text_segment": _ids(tokenizer, q["question"]), "labels": None, "scores": None,
                        "qid": q["question_id"]}
                if anns is not None:
                    ann = anns.get(q["question_id"])
                    if ann is None:
                        raise DataError(f"no annotation for question_id {q['question_id']} ({name})")
                    count = Counter(a["answer"] for a in ann["answers"])
                    labels = [answer2label[a] for a in count if a in answer2label]
                    if not labels:
                        continue
                    item["labels"] = labels
                    item["scores"] = [vqa_soft_score(count[a]) for a in count if a in answer2label]
                items.append(item)
        counts[f"vqa.{name}.jsonl"] = write_jsonl(data_dir / f"vqa.{name}.jsonl", items)
    return counts


def build_vqav2_index(data_dir: str | os.PathLike, tokenizer: Any, vqa_dir: str | os.PathLike | None = None,
                      rest_val_images: int = 1000, seed: int = 0) -> dict[str, int]:
    """The official VQAv2 layout: raw files in ``vqa_dir`` (default ``data_dir/vqa``), images under
    ``data_dir/{train2014,val2014,test2015}``. Writes ``vqa.{train,trainable_val,rest_val,test,test-dev}.jsonl``.
    ``rest_val`` = ``rest_val_images`` val2014 images chosen with ``seed`` (the official split is unseeded)."""
    vqa = Path(vqa_dir) if vqa_dir else Path(data_dir) / "vqa"
    q = lambda s: vqa / f"v2_OpenEnded_mscoco_{s}_questions.json"  # noqa: E731
    a = lambda s: vqa / f"v2_mscoco_{s}_annotations.json"  # noqa: E731
    tmpl = lambda s: f"{s}/COCO_{s}_{{image_id:012d}}.jpg"  # noqa: E731
    val_q = json.loads(q("val2014").read_text())["questions"]
    images = sorted({x["image_id"] for x in val_q})
    rest = set(random.Random(seed).sample(images, min(rest_val_images, len(images))))
    tmp = Path(data_dir) / ".vqa_split"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, keep in (("trainable_val", lambda i: i not in rest), ("rest_val", lambda i: i in rest)):
        (tmp / f"{name}_questions.json").write_text(json.dumps(
            {"questions": [x for x in val_q if keep(x["image_id"])]}))
    splits = {
        "train": [(q("train2014"), a("train2014"), tmpl("train2014"))],
        "trainable_val": [(tmp / "trainable_val_questions.json", a("val2014"), tmpl("val2014"))],
        "rest_val": [(tmp / "rest_val_questions.json", a("val2014"), tmpl("val2014"))],
    }
    for name, s in (("test", "test2015"), ("test-dev", "test-dev2015")):
        if q(s).is_file():
            splits[name] = [(q(s), None, tmpl("test2015"))]
    return build_vqa_index(data_dir, tokenizer, splits, vocab_splits=["train", "trainable_val", "rest_val"])


def build_nlvr2_index(data_dir: str | os.PathLike, tokenizer: Any, nlvr_dir: str | os.PathLike,
                      splits: Mapping[str, str] | None = None) -> dict[str, int]:
    """``nlvr2.{train,dev,test-P}.index.jsonl`` from the NLVR2 repo's ``data/{train,dev,test1}.json`` (json
    lines with ``identifier``, ``sentence``, ``label``, ``directory`` for train). Image paths follow the
    official layout: ``images/train/<directory>/<prefix>-img{0,1}.png``, ``dev/<prefix>-img0.png``,
    ``test1/<prefix>-img0.png``, where ``prefix`` is the identifier without its last field."""
    splits = splits or {"train": "train", "dev": "dev", "test-P": "test1"}
    counts = {}
    for index_name, raw in splits.items():
        errors = DataErrors("raise")
        items = []
        for ex in read_jsonl(Path(nlvr_dir) / "data" / f"{raw}.json", errors, ("identifier", "sentence", "label")):
            prefix = ex["identifier"].rsplit("-", 1)[0]
            folder = f"images/train/{ex['directory']}" if raw == "train" else raw
            items.append({"image_path": f"{folder}/{prefix}-img0.png", "image2_path": f"{folder}/{prefix}-img1.png",
                          "text_segment": _ids(tokenizer, ex["sentence"]),
                          "label": 1 if str(ex["label"]).lower() == "true" else 0, "identifier": ex["identifier"]})
        counts[f"nlvr2.{index_name}.index.jsonl"] = write_jsonl(
            Path(data_dir) / f"nlvr2.{index_name}.index.jsonl", items)
    return counts


def build_imagenet_index(data_dir: str | os.PathLike, train_dir: str = "train", val_dir: str = "val") -> dict[str, int]:
    """``imagenet.{train,val}.index.jsonl`` from class folders ``data_dir/<split_dir>/<class>/<image>``; the
    label is the class index over the sorted train folder names. Paths are relative to ``data_dir``."""
    data_dir = Path(data_dir)
    train_root = data_dir / train_dir
    if not train_root.is_dir():
        raise FileNotFoundError(f"ImageNet train folder not found: {train_root}")
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    label = {c: i for i, c in enumerate(classes)}
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    counts = {}
    for name, sub in (("train", train_dir), ("val", val_dir)):
        root = data_dir / sub
        items = []
        for c in sorted(p.name for p in root.iterdir() if p.is_dir()):
            if c not in label:
                raise DataError(f"{root / c}: class folder not present in {train_root}")
            for f in sorted((root / c).iterdir()):
                if f.suffix.lower() in exts:
                    items.append({"image_path": f.relative_to(data_dir).as_posix(), "label": label[c]})
        counts[f"imagenet.{name}.index.jsonl"] = write_jsonl(data_dir / f"imagenet.{name}.index.jsonl", items)
    return counts
