"""Image captioning (COCO Karpathy splits, nocaps): BEiT-3's masked-caption fine-tuning, beam-search decoding
with the KV cache, the COCO caption metrics (CIDEr headline)."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...constants import INDEX_FILES
from ...data.index_dataset import IndexDataset
from ...data.io import DataError
from ...data.masking import mask_captioning
from .. import losses, metrics
from ..inference import Predictor, Result, image_batches, list_images, print_result, require
from .base import DataSettings, DownstreamTask, EvalSettings, PredictCommand, evaluation_mode


class CaptioningDataset(IndexDataset):
    """``coco_captioning.*.jsonl`` / ``nocaps.*.jsonl`` lines ``{image_path, image_id, text_segment}``.

    Training items (with text) -> {image, image_id, language_tokens (T,), masked_tokens (T,), language_masked_pos
    (T,), padding_mask (T,)}, masked as the official captioning recipe (§2.5; needs ``tokenizer`` for ``<mask>``
    and the vocabulary size, or ``mask_id``/``vocab_size``). Evaluation items (``text_segment: null``) -> {image,
    image_id}.
    """

    required = ("image_path", "image_id")

    def __init__(self, *args: Any, mask_prob: float = 0.6, mask_id: int | None = None, vocab_size: int | None = None,
                 seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tok = self.tokenizer
        self.mask_prob = mask_prob
        self.mask_id = mask_id if mask_id is not None else (tok.mask_id if tok is not None else None)
        self.vocab_size = vocab_size if vocab_size is not None else (tok.vocab_size if tok is not None else None)
        self.seed = seed

    def load(self, item: dict[str, Any], index: int) -> dict[str, Any]:
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


@dataclass
class CaptioningOptions:
    """Captioning's own settings (the official recipe's values)."""

    mask_prob: float = 0.6  # share of caption tokens masked in training
    label_smoothing: float = 0.1  # of the captioning loss
    drop_worst_ratio: float = 0.2  # share of the highest-loss tokens dropped ...
    drop_worst_after: int = 12000  # ... after this optimizer step
    num_beams: int = 3  # beam search at evaluation and prediction (1: one beam, see multiway.model.generation)
    max_gen_len: int = 32  # generated length with specials
    length_penalty: float = 0.6
    caption_metrics: list[str] | None = None  # evaluation: just these (e.g. [CIDEr]); None: all COCO metrics


def caption_references(task_name: str, dataset: Dataset) -> dict[int, list[str]]:
    """``{image_id: [reference captions]}`` of a captioning split: ``coco_karpathy_<split>_gt.json`` or
    ``<task>_<split>_gt.json`` (COCO caption format) in the data folder, else the split's own captions."""
    data_dir, split = dataset.data_dir, dataset.split
    for name in (f"coco_karpathy_{split}_gt.json", f"{task_name}_{split}_gt.json"):
        path = data_dir / name
        if path.is_file():
            gt = json.loads(path.read_text())
            refs: dict[int, list[str]] = defaultdict(list)
            for ann in gt["annotations"]:
                refs[ann["image_id"]].append(ann["caption"])
            return dict(refs)
    refs = defaultdict(list)
    for item in dataset.items:
        seg = item.get("text_segment")
        if seg is None:
            continue
        refs[item["image_id"]].append(seg if isinstance(seg, str) else dataset.tokenizer.decode(seg))
    if not refs:
        raise FileNotFoundError(
            f"{task_name} {split}: no caption references — put coco_karpathy_{split}_gt.json (COCO format) in {data_dir} "
            "or give the split's items a text_segment"
        )
    return dict(refs)


def caption_scores(preds: list[dict], refs: dict, only: Sequence[str] | None = None) -> dict[str, float]:
    """pycocoevalcap metrics with CIDEr etc. scaled to percent-like numbers (CIDEr x100 as papers report)."""
    scores = metrics.caption_metrics(preds, refs, only=only)
    return {k: 100.0 * v for k, v in scores.items()}


def _train_captions(train_set: Dataset) -> list[str]:
    return [i["text_segment"] if isinstance(i["text_segment"], str) else train_set.tokenizer.decode(i["text_segment"])
            for i in train_set.items if i.get("text_segment") is not None]


@torch.no_grad()
def caption(pred: Predictor, inputs: Iterable[str], num_beams: int | None = None, max_len: int | None = None,
            length_penalty: float | None = None, batch_size: int = 16) -> Result:
    """Caption every image: rows ``{"path", "caption"}``; decoding defaults from the run's options."""
    from ...model.generation import generate

    require(pred, CocoCaptioning.head, tokenizer=True)
    opts = pred.downstream.options
    num_beams = num_beams or opts.num_beams
    max_len = max_len or min(opts.max_gen_len, pred.max_text_len)
    length_penalty = opts.length_penalty if length_penalty is None else length_penalty
    result = Result()
    for images, ok in image_batches(pred, list_images(inputs), batch_size, result):
        out = generate(pred.model, images, pred.tokenizer.mask_id, num_beams=num_beams, max_len=max_len, length_penalty=length_penalty,
                       vocab_limit=pred.tokenizer.vocab_size)
        for p, seq in zip(ok, out.sequences):
            result.rows.append({"path": str(p), "caption": pred.tokenizer.decode(seq)})
    return result


def caption_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``multiway predict caption`` (METER's captioning takes the same)."""
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--num-beams", dest="num_beams", type=int)
    parser.add_argument("--max-len", dest="max_len", type=int)


def _caption_run(args: argparse.Namespace, pred: Predictor) -> int:
    return print_result(caption(pred, args.inputs, num_beams=args.num_beams, max_len=args.max_len), args.json, args.strict)


class CocoCaptioning(DownstreamTask):
    """Captioning on COCO (Karpathy splits): image + partly masked caption -> the masked words (label-smoothed
    KL, the worst tokens dropped late in training); evaluation decodes captions by beam search and scores them
    against the references (``captions_<split>.json`` written into the evaluation's ``out_dir``)."""

    name = "coco_captioning"
    head = "captioning"
    metric, metric_label = "CIDEr", "CIDEr"
    splits = INDEX_FILES["coco_captioning"]
    Options = CaptioningOptions
    recipe = "finetune_coco_captioning_base.yaml"
    find_unused_parameters = True
    predict_commands = (PredictCommand("caption", "caption images", caption_arguments, _caption_run),)

    def predict(self, predictor: Predictor, images: Any = None, text: Any = None, **options: Any) -> Result:
        """Captions of ``images``: rows ``{"path", "caption"}`` (options: num_beams, max_len, length_penalty)."""
        if images is None:
            raise TypeError(f"{self.name} predict needs images=")
        return caption(predictor, images, **options)

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        return CaptioningDataset(data.data_dir, split, self.index_files(split), self.image_transform(split, data),
                                 tokenizer=data.tokenizer, max_len=data.max_text_len, on_error=data.on_error,
                                 mask_prob=self.options.mask_prob)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        pos = batch["language_masked_pos"]
        logits, _ = model(batch["image"], batch["masked_tokens"], batch["padding_mask"], language_masked_pos=pos)
        targets = batch["language_tokens"][pos.bool()]
        o = self.options
        loss = losses.captioning_loss(logits, targets, step, o.label_smoothing, o.drop_worst_ratio, o.drop_worst_after)
        return loss, {"acc": (logits.detach().argmax(-1) == targets).float().mean().item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        from ...model.generation import generate

        settings = settings or EvalSettings()
        if dataset.tokenizer is None:
            raise ValueError(f"{self.name} evaluation needs the tokenizer to decode captions (tokenizer=...)")
        o, tok = self.options, dataset.tokenizer
        preds = []
        with evaluation_mode(model):
            for batch in self.device_batches(model, dataset, settings):
                out = generate(model, batch["image"], tok.mask_id, num_beams=o.num_beams, max_len=o.max_gen_len,
                               length_penalty=o.length_penalty, vocab_limit=tok.vocab_size)
                for iid, seq in zip(batch["image_id"].tolist(), out.sequences):
                    preds.append({"image_id": iid, "caption": tok.decode(seq)})
        path = self.output_path(settings, f"captions_{settings.split}.json")
        if path is not None:
            path.write_text(json.dumps(preds))
        return caption_scores(preds, caption_references(self.name, dataset), only=o.caption_metrics)

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """A random training caption for each test image (one seeded draw): what an image-blind sampler of
        in-domain captions scores."""
        texts = _train_captions(train_set)
        refs = caption_references(self.name, test_set)
        rng = random.Random(0)
        preds = [{"image_id": iid, "caption": rng.choice(texts)} for iid in refs]
        return caption_scores(preds, refs, only=[self.metric])[self.metric]

    def baselines(self, train_set: Dataset, test_set: Dataset) -> dict[str, float]:
        """``most_frequent_caption``: the most frequent training caption given to every test image."""
        constant = Counter(_train_captions(train_set)).most_common(1)[0][0]
        refs = caption_references(self.name, test_set)
        preds = [{"image_id": iid, "caption": constant} for iid in refs]
        return {"most_frequent_caption": caption_scores(preds, refs, only=[self.metric])[self.metric]}


class NoCaps(CocoCaptioning):
    """nocaps: a COCO-trained captioner evaluated on novel objects (``nocaps.{val,test}.jsonl``; references from
    ``nocaps_<split>_gt.json``)."""

    name = "nocaps"
    splits = INDEX_FILES["nocaps"]
    recipe = "finetune_nocaps_base.yaml"


__all__ = ["CaptioningDataset", "CaptioningOptions", "CocoCaptioning", "NoCaps", "caption", "caption_references", "caption_scores"]
