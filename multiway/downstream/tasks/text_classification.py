"""Text classification through the language encoder: ``text,label`` rows (CSV or jsonl), accuracy."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...data.index_dataset import encode_text
from .. import losses, metrics
from ..inference import Predictor, Result, encode_texts, print_result, require
from .base import DataSettings, DownstreamTask, EvalSettings, PredictCommand


def read_text_classification(path: Path) -> list[dict]:
    """``text,label`` rows from a CSV (with a header) or jsonl; labels may be names or integers."""
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    for n, row in enumerate(rows, 1):
        if "text" not in row or "label" not in row:
            raise ValueError(f"{path}: row {n} needs fields 'text' and 'label', got {sorted(row)}")
    return rows


def _natural(s: str) -> tuple[int, int | str]:
    return (0, int(s)) if s.lstrip("-").isdigit() else (1, s)


class TextClassificationDataset(Dataset):
    """``text_classification.{split}.{jsonl,csv}`` rows ``text,label`` -> {language_tokens (T,), padding_mask (T,),
    label}.

    ``label_names`` fixes the label order (default: the distinct labels of this split, integers in numeric order
    first; pass the training split's names to evaluate another split).
    """

    def __init__(self, data_dir: str | Path, split: str, files: Sequence[str], tokenizer: Any, max_len: int = 64,
                 label_names: Sequence[str] | None = None) -> None:
        self.data_dir, self.split, self.tokenizer, self.max_len = Path(data_dir), split, tokenizer, max_len
        found = [self.data_dir / f for f in files if (self.data_dir / f).is_file()]
        if not found:
            raise FileNotFoundError(f"text_classification {split}: none of {list(files)} found in {self.data_dir}")
        self.items = [row for path in found for row in read_text_classification(path)]
        labels = {str(i["label"]) for i in self.items}
        self.label_names = list(label_names) if label_names is not None else sorted(labels, key=_natural)
        unknown = labels - set(self.label_names)
        if unknown:
            raise ValueError(f"text_classification {split}: labels {sorted(unknown)[:5]} are not among {self.label_names[:10]}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        ids, pad = encode_text(str(item["text"]), self.tokenizer, self.max_len)
        return {"language_tokens": ids, "padding_mask": pad, "label": self.label_names.index(str(item["label"]))}


@torch.no_grad()
def classify_texts(pred: Predictor, texts: Sequence[str], topk: int = 3, batch_size: int = 64) -> Result:
    """Classify every text: rows ``{"text", "label", "top": [[name, prob], ...]}``."""
    require(pred, TextClassification.head, tokenizer=True)
    result = Result()
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        ids, pad = encode_texts(pred, chunk)
        probs = pred.model(ids, pad).float().softmax(-1)
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        for text, vals, idx in zip(chunk, top.values, top.indices):
            names = [pred.labels[j] if pred.labels else str(j) for j in idx.tolist()]
            pairs = [[n, round(v, 4)] for n, v in zip(names, vals.tolist())]
            result.rows.append({"text": text, "label": pairs[0][0], "top": pairs})
    return result


def _classify_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", help="a text file, one text a line")
    parser.add_argument("--labels", help="class names, one a line (default: the run's)")
    parser.add_argument("--topk", type=int, default=3)


def _classify_text_run(args: argparse.Namespace, pred: Predictor) -> int:
    texts = [t for t in Path(args.texts).read_text().splitlines() if t.strip()]
    return print_result(classify_texts(pred, texts, topk=args.topk), args.json, args.strict)


class TextClassification(DownstreamTask):
    """Text classification: the language encoder's [CLS] -> pooler -> linear; cross-entropy; accuracy. Labels are
    names (or integers) read from the training split, saved in ``task.json``."""

    name = "text_classification"
    head = "textclassification"
    metric, metric_label = "acc", "accuracy"
    splits = {s: (f"text_classification.{s}.jsonl", f"text_classification.{s}.csv") for s in ("train", "val", "test")}
    recipe = "finetune_text_classification_base.yaml"
    find_unused_parameters = True
    predict_commands = (PredictCommand("classify-text", "classify texts (one a line)", _classify_text_arguments, _classify_text_run),)

    def predict(self, predictor: Predictor, images: Any = None, text: Any = None, **options: Any) -> Result:
        """Labels of ``text`` (a string or a list): rows ``{"text", "label", "top"}`` (option: topk)."""
        if text is None:
            raise TypeError(f"{self.name} predict needs text=")
        return classify_texts(predictor, [text] if isinstance(text, str) else list(text), **options)

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        return TextClassificationDataset(data.data_dir, split, self.index_files(split), data.tokenizer, data.max_text_len, data.labels)

    def num_classes(self, train_set: Dataset) -> int:
        return len(train_set.label_names)

    def label_names(self, train_set: Dataset) -> list[str]:
        return list(train_set.label_names)

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return model(batch["language_tokens"], batch["padding_mask"])

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        logits = self._logits(model, batch)
        return losses.classification_loss(logits, batch["label"]), {"acc": metrics.accuracy(logits.detach(), batch["label"]) / 100}

    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        return self.evaluate_accuracy(model, dataset, settings, self._logits)

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """Uniform guessing over the training split's labels."""
        return 100.0 / len(train_set.label_names)


__all__ = ["TextClassification", "TextClassificationDataset", "classify_texts", "read_text_classification"]
