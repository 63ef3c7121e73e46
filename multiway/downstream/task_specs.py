"""Downstream task definitions: data (official index formats), batch collation, loss and evaluation per task.

A task is described by a :class:`TaskSpec` in :data:`TASKS`; :func:`build_dataset` reads its index files and
:func:`task_loss` / :func:`evaluate_model` run the official losses and metrics. Fine-tuning
(:func:`multiway.downstream.finetune.finetune`) and ``multiway evaluate`` are built from these pieces.

Data layout (``data_dir``) — the official BEiT-3 jsonl indexes (§5 of the reference); image paths are relative
to ``data_dir``; ``text_segment`` is a string or token ids without specials:

============================  ==========================================================  =======================================
task                          index files (train / val / test)                             item fields
============================  ==========================================================  =======================================
imagenet                      imagenet.{train,val}.index.jsonl (test = val)               image_path, label
vqav2                         vqa.train.jsonl+vqa.trainable_val.jsonl / vqa.rest_val.jsonl image_path, text_segment, labels, scores,
                              / vqa.test.jsonl (test-dev: vqa.test-dev.jsonl); answer2label.txt  qid
nlvr2                         nlvr2.{train,dev,test-P}.index.jsonl                        image_path, image2_path, text_segment, label
coco_retrieval / flickr30k    {task}.{train,val,test}.jsonl                               image_path, text_segment, image_id
coco_captioning / nocaps      coco_captioning.train.jsonl / {task}.{val,test}.jsonl       image_path, text_segment, image_id
text_classification           text_classification.{train,val,test}.{jsonl,csv}           text, label (ours)
============================  ==========================================================  =======================================

Caption references for evaluation come from ``coco_karpathy_{val,test}_gt.json`` / ``nocaps_{val,test}_gt.json``
(COCO annotation format) when present, else from the split's own items that carry captions.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from . import losses, metrics

BOS_ID, PAD_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class TaskSpec:
    """What a fine-tuning task needs: its model head, index files per split, and its headline metric."""

    name: str
    head: str  # task suffix of the model registry
    splits: dict[str, tuple[str, ...]]
    metric: str  # key of evaluate_model()'s result shown in tables
    metric_label: str
    normalize: str = "vl"  # "vl" (mean=std=0.5) or "imagenet"


TASKS: dict[str, TaskSpec] = {
    "imagenet": TaskSpec(
        "imagenet", "imageclassification",
        {"train": ("imagenet.train.index.jsonl",), "val": ("imagenet.val.index.jsonl",), "test": ("imagenet.val.index.jsonl",)},
        "acc@1", "top-1 acc", normalize="imagenet",
    ),
    "vqav2": TaskSpec(
        "vqav2", "vqav2",
        {"train": ("vqa.train.jsonl", "vqa.trainable_val.jsonl"), "val": ("vqa.rest_val.jsonl",), "test": ("vqa.test.jsonl",),
         "test-dev": ("vqa.test-dev.jsonl",)},
        "vqa_score", "VQA score",
    ),
    "nlvr2": TaskSpec(
        "nlvr2", "nlvr2",
        {"train": ("nlvr2.train.index.jsonl",), "val": ("nlvr2.dev.index.jsonl",), "test": ("nlvr2.test-P.index.jsonl",)},
        "acc", "accuracy",
    ),
    **{
        t: TaskSpec(t, "retrieval", {s: (f"{t}.{s}.jsonl",) for s in ("train", "val", "test")}, "r@1", "R@1 (IR+TR)/2")
        for t in ("coco_retrieval", "flickr30k")
    },
    **{
        t: TaskSpec(
            t, "captioning",
            {"train": ("coco_captioning.train.jsonl",), "val": (f"{t}.val.jsonl",), "test": (f"{t}.test.jsonl",)},
            "CIDEr", "CIDEr",
        )
        for t in ("coco_captioning", "nocaps")
    },
    "text_classification": TaskSpec(
        "text_classification", "textclassification",
        {s: (f"text_classification.{s}.jsonl", f"text_classification.{s}.csv") for s in ("train", "val", "test")},
        "acc", "accuracy",
    ),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


# --- reading ----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    return rows


def read_text_classification(path: Path) -> list[dict]:
    """``text,label`` rows from a CSV (with a header) or jsonl; labels may be names or integers."""
    rows = read_jsonl(path) if path.suffix == ".jsonl" else list(csv.DictReader(open(path, newline="")))
    for n, row in enumerate(rows, 1):
        if "text" not in row or "label" not in row:
            raise ValueError(f"{path}: row {n} needs fields 'text' and 'label', got {sorted(row)}")
    return rows


def read_answer_vocab(data_dir: Path) -> list[str]:
    """Answers by label from ``answer2label.txt`` (jsonl ``{"answer", "label"}``)."""
    from .predict import read_labels

    return read_labels(data_dir / "answer2label.txt")


def caption_references(spec: TaskSpec, data_dir: Path, split: str, items: Sequence[dict], tokenizer) -> dict[int, list[str]]:
    """``{image_id: [reference captions]}`` for a captioning split."""
    for name in (f"coco_karpathy_{split}_gt.json", f"{spec.name}_{split}_gt.json"):
        path = data_dir / name
        if path.is_file():
            gt = json.loads(path.read_text())
            refs: dict[int, list[str]] = defaultdict(list)
            for ann in gt["annotations"]:
                refs[ann["image_id"]].append(ann["caption"])
            return dict(refs)
    refs = defaultdict(list)
    for item in items:
        seg = item.get("text_segment")
        if seg is None:
            continue
        refs[item["image_id"]].append(seg if isinstance(seg, str) else tokenizer.decode(seg))
    if not refs:
        raise FileNotFoundError(
            f"{spec.name} {split}: no caption references — put coco_karpathy_{split}_gt.json (COCO format) in {data_dir} "
            "or give the split's items a text_segment"
        )
    return dict(refs)


# --- datasets -----------------------------------------------------------------------------------------


def encode_text(segment: str | Sequence[int], tokenizer, max_len: int) -> tuple[list[int], list[int]]:
    """``[<s>] ids [</s>]`` padded to ``max_len``: (ids, padding_mask)."""
    if isinstance(segment, str):
        if tokenizer is None:
            raise ValueError("the text is a string but no tokenizer was given (--tokenizer)")
        ids = tokenizer.text_to_ids(segment)
    else:
        ids = [int(i) for i in segment]
    ids = [BOS_ID] + ids[: max_len - 2] + [EOS_ID]
    n = len(ids)
    return ids + [PAD_ID] * (max_len - n), [0] * n + [1] * (max_len - n)


class TextClassificationDataset(Dataset):
    """``text_classification.{split}.{jsonl,csv}`` rows ``text,label`` -> {language_tokens, padding_mask, label}.

    ``label_names`` fixes the label order (default: the sorted distinct labels of this split; pass the training
    split's names to evaluate another split).
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, tokenizer, max_len: int = 64, label_names: Sequence[str] | None = None):
        spec = TASKS["text_classification"]
        self.data_dir, self.split, self.tokenizer, self.max_len = Path(data_dir), split, tokenizer, max_len
        found = [self.data_dir / f for f in spec.splits.get(split, ()) if (self.data_dir / f).is_file()]
        if not found:
            raise FileNotFoundError(f"text_classification {split}: none of {spec.splits.get(split)} found in {self.data_dir}")
        self.items = [row for path in found for row in read_text_classification(path)]
        self.label_names = list(label_names) if label_names is not None else sorted({str(i["label"]) for i in self.items}, key=_natural)
        unknown = {str(i["label"]) for i in self.items} - set(self.label_names)
        if unknown:
            raise ValueError(f"text_classification {split}: labels {sorted(unknown)[:5]} are not among {self.label_names[:10]}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        ids, pad = encode_text(str(item["text"]), self.tokenizer, self.max_len)
        return {"language_tokens": ids, "padding_mask": pad, "label": self.label_names.index(str(item["label"]))}


def _natural(s: str):
    return (0, int(s)) if s.lstrip("-").isdigit() else (1, s)


def build_dataset(spec: TaskSpec, data_dir: str | os.PathLike, split: str, tokenizer=None, max_len: int = 64,
                  img_size: int = 224, **kwargs: Any) -> Dataset:
    """The dataset of a task split: :func:`multiway.data.formats.create_dataset` for the official tasks (their
    transforms, captioning masking with ``mask_prob``), :class:`TextClassificationDataset` for ours."""
    if spec.name == "text_classification":
        return TextClassificationDataset(data_dir, split, tokenizer, max_len, kwargs.get("label_names"))
    from ..data.formats import create_dataset

    kwargs.pop("label_names", None)
    crop_scale, hflip = tuple(kwargs.pop("crop_scale", (0.5, 1.0))), kwargs.pop("hflip", True)
    auto_augment, randaug = kwargs.pop("imagenet_auto_augment", True), kwargs.pop("randaug", False)
    if split == "train":
        from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform

        if spec.name == "imagenet" and not auto_augment:  # the VL crop-and-flip views, ImageNet's normalisation
            kwargs["transform"] = build_transform("", is_train=True, img_size=img_size, crop_scale=crop_scale, hflip=hflip,
                                                  mean=IMAGENET_MEAN, std=IMAGENET_STD)
        elif spec.name != "imagenet":
            kwargs["transform"] = build_transform(spec.name, is_train=True, img_size=img_size, randaug=randaug,
                                                  crop_scale=crop_scale, hflip=hflip)
    return create_dataset(spec.name, data_dir, split, tokenizer=tokenizer, max_len=max_len, img_size=img_size, **kwargs)


def collate(items: list[dict]) -> dict[str, Any]:
    """:func:`multiway.data.formats.collate_batch` (tensors stacked, ids to long, scores to float)."""
    from ..data.formats import collate_batch

    return collate_batch(items)


def _tensors_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


# --- losses -------------------------------------------------------------------------------------------


@dataclass
class LossOptions:
    label_smoothing: float = 0.0  # ImageNet without mixup (official 0.1); captioning uses captioning_label_smoothing
    mixup: float = 0.0
    cutmix: float = 0.0
    num_classes: int = 0
    captioning_label_smoothing: float = 0.1
    drop_worst_ratio: float = 0.2
    drop_worst_after: int = 12000
    _mixup_fn: Any = field(default=None, repr=False)

    def mixup_fn(self):
        if self._mixup_fn is None and (self.mixup > 0 or self.cutmix > 0):
            from timm.data import Mixup

            self._mixup_fn = Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, label_smoothing=self.label_smoothing,
                                   num_classes=self.num_classes)
        return self._mixup_fn


def task_loss(spec: TaskSpec, model: nn.Module, batch: dict[str, Tensor], opts: LossOptions, step: int = 0) -> tuple[Tensor, dict[str, float]]:
    """The official loss of ``spec`` on one batch: (scalar loss, logs)."""
    head = spec.head
    if head == "imageclassification":
        image, target = batch["image"], batch["label"]
        mix = opts.mixup_fn() if model.training else None
        if mix is not None:
            if image.shape[0] % 2:
                raise ValueError("mixup/cutmix need an even batch size")
            image, target = mix(image, target)
        logits = model(image=image)
        loss = losses.classification_loss(logits, target, opts.label_smoothing)
        return loss, {"acc": metrics.accuracy(logits.detach(), target) / 100}
    if head == "vqav2":
        logits = model(image=batch["image"], question=batch["language_tokens"], padding_mask=batch["padding_mask"])
        return losses.vqa_loss(logits, batch["labels"]), {"score": metrics.vqa_score(logits.detach(), batch["labels"]) / 100}
    if head == "nlvr2":
        logits = model(image_a=batch["image"], image_b=batch["image2"], text_description=batch["language_tokens"], padding_mask=batch["padding_mask"])
        return losses.classification_loss(logits, batch["label"]), {"acc": metrics.accuracy(logits.detach(), batch["label"]) / 100}
    if head == "retrieval":
        loss, _, _ = model(image=batch["image"], text_description=batch["language_tokens"], padding_mask=batch["padding_mask"])
        return loss, {"logit_scale": model.logit_scale.exp().item()}
    if head == "captioning":
        pos = batch["language_masked_pos"]
        logits, _ = model(batch["image"], batch["masked_tokens"], batch["padding_mask"], language_masked_pos=pos)
        targets = batch["language_tokens"][pos.bool()]
        loss = losses.captioning_loss(logits, targets, step, opts.captioning_label_smoothing, opts.drop_worst_ratio, opts.drop_worst_after)
        return loss, {"acc": (logits.detach().argmax(-1) == targets).float().mean().item()}
    if head == "textclassification":
        logits = model(batch["language_tokens"], batch["padding_mask"])
        return losses.classification_loss(logits, batch["label"]), {"acc": metrics.accuracy(logits.detach(), batch["label"]) / 100}
    raise KeyError(f"no loss for head {head!r}")


# --- evaluation -----------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    batch_size: int = 64
    num_workers: int = 0
    num_beams: int = 3
    max_len: int = 32
    length_penalty: float = 0.6
    submission_path: str | None = None  # VQA test(-dev): write the submission json here
    predictions_path: str | None = None  # captioning: write [{image_id, caption}] here
    caption_metrics: Sequence[str] | None = None  # captioning: just these (e.g. ["CIDEr"]); default all


@torch.no_grad()
def evaluate_model(spec: TaskSpec, model: nn.Module, dataset: Dataset, opts: EvalOptions | None = None) -> dict[str, float]:
    """Run the standard metric of ``spec`` over ``dataset``; returns the metric dict (headline key: ``spec.metric``)."""
    opts = opts or EvalOptions()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=opts.batch_size, shuffle=False, num_workers=opts.num_workers, collate_fn=collate)
    head = spec.head
    try:
        if head in ("imageclassification", "nlvr2", "textclassification", "vqav2"):
            logits, targets, qids = [], [], []
            for batch in loader:
                batch = _tensors_to(batch, device)
                if head == "imageclassification":
                    out = model(image=batch["image"])
                elif head == "nlvr2":
                    out = model(image_a=batch["image"], image_b=batch["image2"], text_description=batch["language_tokens"],
                                padding_mask=batch["padding_mask"])
                elif head == "textclassification":
                    out = model(batch["language_tokens"], batch["padding_mask"])
                else:
                    out = model(image=batch["image"], question=batch["language_tokens"], padding_mask=batch["padding_mask"])
                logits.append(out.float().cpu())
                if "labels" in batch or "label" in batch:
                    targets.append(batch.get("labels", batch.get("label")).cpu())
                if "qid" in batch:
                    qids.append(batch["qid"].cpu())
            logits_t = torch.cat(logits)
            if head == "vqav2":
                result: dict[str, float] = {}
                if targets:
                    result["vqa_score"] = metrics.vqa_score(logits_t, torch.cat(targets))
                if opts.submission_path and qids:
                    answers = [dataset.label2answer[i] for i in range(len(dataset.label2answer))]
                    metrics.write_vqa_submission(torch.cat(qids).tolist(), logits_t.argmax(-1).tolist(), answers, opts.submission_path)
                return result
            target_t = torch.cat(targets)
            if head == "imageclassification":
                return metrics.topk_accuracy(logits_t, target_t, ks=(1, 5))
            return {"acc": metrics.accuracy(logits_t, target_t)}
        if head == "retrieval":
            img, iids, txt, tiids = [], [], [], []
            for batch in loader:
                img.append(model.encode_image(batch["image"].to(device)).float().cpu())
                txt.append(model.encode_text(batch["language_tokens"].to(device), batch["padding_mask"].to(device)).float().cpu())
                iids.append(batch["image_id"])
                tiids.append(batch["image_id"])
            r = metrics.retrieval_recall(torch.cat(img), torch.cat(iids), torch.cat(txt), torch.cat(tiids))
            r["r@1"] = (r["ir_r@1"] + r["tr_r@1"]) / 2
            return r
        if head == "captioning":
            from ..model.generation import generate

            if dataset.tokenizer is None:
                raise ValueError("captioning evaluation needs the tokenizer to decode captions")
            preds = []
            for batch in loader:
                out = generate(model, batch["image"].to(device), dataset.tokenizer.mask_id, num_beams=opts.num_beams,
                               max_len=opts.max_len, length_penalty=opts.length_penalty, vocab_limit=dataset.tokenizer.vocab_size)
                for iid, seq in zip(batch["image_id"].tolist(), out.sequences):
                    preds.append({"image_id": iid, "caption": dataset.tokenizer.decode(seq)})
            if opts.predictions_path:
                Path(opts.predictions_path).parent.mkdir(parents=True, exist_ok=True)
                Path(opts.predictions_path).write_text(json.dumps(preds))
            refs = caption_references(spec, dataset.data_dir, dataset.split, dataset.items, dataset.tokenizer)
            return caption_scores(preds, refs, only=opts.caption_metrics)
        raise KeyError(f"no evaluation for head {head!r}")
    finally:
        model.train(was_training)


def caption_scores(preds: list[dict], refs: dict, only: Sequence[str] | None = None) -> dict[str, float]:
    """pycocoevalcap metrics with CIDEr etc. scaled to percent-like numbers (CIDEr ×100 as papers report)."""
    scores = metrics.caption_metrics(preds, refs, only=only)
    return {k: 100.0 * v for k, v in scores.items()}


def _train_captions(train: Dataset) -> list[str]:
    return [i["text_segment"] if isinstance(i["text_segment"], str) else train.tokenizer.decode(i["text_segment"])
            for i in train.items if i.get("text_segment") is not None]


def constant_caption_score(spec: TaskSpec, train: Dataset, test: Dataset) -> float:
    """Captioning: the headline metric when every test image gets the most frequent training caption."""
    constant = Counter(_train_captions(train)).most_common(1)[0][0]
    refs = caption_references(spec, test.data_dir, test.split, test.items, test.tokenizer)
    return caption_scores([{"image_id": iid, "caption": constant} for iid in refs], refs, only=[spec.metric])[spec.metric]


class OtherImages(Dataset):
    """The examples of ``dataset``, each with the image(s) of another example (same text, labels).

    The partner of example ``i`` is the first example from ``i + offset`` on (cyclically) whose image differs from
    example ``i``'s: in VQA several questions in a row ask about one image, so the next example would often
    bring back the same picture. A model's score here is what it gets without reading the image: the gap to its
    real score measures how much it uses the image (a VQA model can score well from the question alone)."""

    _IMAGE_KEYS = ("image", "image2")

    def __init__(self, dataset: Dataset, offset: int = 1):
        if len(dataset) < 2:
            raise ValueError("OtherImages needs at least two examples")
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return len(self.dataset)

    def _same_images(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in self._IMAGE_KEYS if k in a)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        n = len(self.dataset)
        for step in range(n - 1):
            other = self.dataset[(index + self.offset + step) % n]
            if not self._same_images(item, other):
                break
        else:
            raise ValueError(f"OtherImages: every example shows the image(s) of example {index}; nothing to swap in")
        for key in self._IMAGE_KEYS:
            if key in item:
                item[key] = other[key]
        return item

    def __getattr__(self, name: str):  # label2answer, items, tokenizer ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def chance_level(spec: TaskSpec, train: Dataset, test: Dataset, num_classes: int | None = None) -> float:
    """The headline metric of a trivial predictor on ``test``: uniform guessing for classification and retrieval
    (expected value), a random training caption per image for captioning."""
    head = spec.head
    if head in ("imageclassification", "textclassification"):
        n = num_classes or len({int(i["label"]) if head == "imageclassification" else str(i["label"]) for i in train.items})
        return 100.0 / n
    if head == "nlvr2":
        return 50.0
    if head == "vqav2":
        n = num_classes or train.num_labels
        total = sum(sum(i.get("scores", [])) for i in test.items)
        return 100.0 * total / max(1, len(test.items)) / n
    if head == "retrieval":
        num_images = len({i["image_id"] for i in test.items})
        per_image = Counter(i["image_id"] for i in test.items)
        num_texts = len(test.items)
        ir = 100.0 / num_images
        tr = 100.0 * sum(c / num_texts for c in per_image.values()) / num_images  # ~ P(a random text is one of its own)
        return (ir + tr) / 2
    if head == "captioning":
        # a random training caption for each test image (one seeded draw): what an image-blind sampler of
        # in-domain captions scores; constant_caption_score() is the most-frequent-caption baseline
        texts = _train_captions(train)
        refs = caption_references(spec, test.data_dir, test.split, test.items, test.tokenizer)
        rng = random.Random(0)
        preds = [{"image_id": iid, "caption": rng.choice(texts)} for iid in refs]
        return caption_scores(preds, refs, only=[spec.metric])[spec.metric]
    raise KeyError(head)


__all__ = [
    "TASKS",
    "EvalOptions",
    "LossOptions",
    "OtherImages",
    "TaskSpec",
    "TextClassificationDataset",
    "build_dataset",
    "caption_references",
    "chance_level",
    "collate",
    "constant_caption_score",
    "encode_text",
    "evaluate_model",
    "get_task",
    "task_loss",
]
