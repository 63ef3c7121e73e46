"""SNLI-VE visual entailment as a METER task on the shared :class:`~multiway.downstream.tasks.DownstreamTask` interface.

Does the image (the premise) entail, contradict or say nothing about the text (the hypothesis)? Three classes
with METER's label ids (contradiction 0, neutral 1, entailment 2); METER's ``snli_classifier`` on the pooled
``[text CLS ; image CLS]`` feature, cross-entropy, accuracy. METER's recipe (``task_finetune_snli``): batch 64,
5 epochs, lr 2e-6 with the fusion x5 and the head x10, 10% warmup then linear decay, 384 px, 50 text tokens
(:data:`RECIPE`, the values for :class:`multiway.meter.config.OptimConfig` and the data settings).

Index files ``snli_ve.{train,dev,test}.jsonl`` (``multiway meter arrow2jsonl --task snli_ve`` writes them from
METER's ``snli_*.arrow``): ``{"image_path", "text_segment" (the hypothesis), "label", "premise" (optional)}``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data.index_dataset import IndexDataset
from ..downstream import metrics
from ..downstream.tasks.base import DataSettings, DownstreamTask, EvalSettings
from .arrow import SNLI_LABELS
from .family import METERFamily
from .model import METERForSNLIVE

#: METER's fine-tuning recipe for SNLI-VE (meter/config.py, task_finetune_snli_*).
RECIPE: dict[str, Any] = dict(
    batch_size=64, max_epoch=5, lr=2e-6, lr_mult_top=5.0, lr_mult_head=10.0, warmup_ratio=0.1, img_size=384, max_text_len=50,
)


class SNLIVEDataset(IndexDataset):
    """``snli_ve.<split>.jsonl`` lines -> {image (3,S,S), language_tokens (T,), padding_mask (T,), label}."""

    required = ("image_path", "text_segment", "label")

    def load(self, item: dict[str, Any], index: int) -> dict[str, Any]:
        label = item["label"]
        if label not in range(len(SNLI_LABELS)):
            from ..data.io import DataError

            raise DataError(f"{item['_where']}: label must be 0..2 ({', '.join(SNLI_LABELS)}), got {label!r}")
        ids, pad, _ = self._text(item)
        return {"image": self._image(item["image_path"], item), "language_tokens": ids, "padding_mask": pad, "label": int(label)}


class SNLIVE(METERFamily, DownstreamTask):
    """SNLI-VE on a METER model: image + hypothesis -> 3 classes; cross-entropy; accuracy. Inits from a METER
    release (its ``snli_classifier`` loads when present) or a METER file (:class:`METERFamily`)."""

    name = "snli_ve"
    head = "snli_ve"
    metric, metric_label = "acc", "accuracy"
    splits = {"train": ("snli_ve.train.jsonl",), "val": ("snli_ve.dev.jsonl",), "test": ("snli_ve.test.jsonl",)}
    image_blind_check = True

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        return SNLIVEDataset(data.data_dir, split, self.index_files(split), self.image_transform(split, data), tokenizer=data.tokenizer,
                             max_len=data.max_text_len, on_error=data.on_error)

    def num_classes(self, train_set: Dataset) -> int:
        return len(SNLI_LABELS)

    def label_names(self, train_set: Dataset) -> list[str]:
        return list(SNLI_LABELS)

    def build_model(self, source: Any, num_classes: int | None = None) -> nn.Module:
        """source: a METER model (:class:`METERModel`, e.g. a pre-trained one), a :class:`MeterConfig` or a preset name."""
        if num_classes not in (None, len(SNLI_LABELS)):
            raise ValueError(f"SNLI-VE has {len(SNLI_LABELS)} classes, got num_classes={num_classes}")
        return METERForSNLIVE(source)

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return model(batch["image"], batch["language_tokens"], batch["padding_mask"])

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        logits = self._logits(model, batch).float()
        return F.cross_entropy(logits, batch["label"]), {"acc": metrics.accuracy(logits.detach(), batch["label"]) / 100}

    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        return self.evaluate_accuracy(model, dataset, settings, self._logits)

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """Always answering the training split's most frequent class."""
        counts = Counter(int(it["label"]) for it in getattr(train_set, "items", []))
        if not counts:
            return 100.0 / len(SNLI_LABELS)
        majority = counts.most_common(1)[0][0]
        test = [int(it["label"]) for it in getattr(test_set, "items", [])]
        return 100.0 * sum(t == majority for t in test) / max(1, len(test))


__all__ = ["RECIPE", "SNLIVE", "SNLIVEDataset"]
