"""NLVR2 visual reasoning: is a statement true of a pair of images? Binary classification, accuracy."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...constants import INDEX_FILES
from ...data.index_dataset import IndexDataset
from .. import losses, metrics
from ..inference import Predictor, Result, encode_texts, list_images, print_result, read_images, require
from .base import DataSettings, DownstreamTask, EvalSettings, PredictCommand


class NLVR2Dataset(IndexDataset):
    """``nlvr2.{train,dev,test-P}.index.jsonl`` lines ``{image_path, image2_path, text_segment, label}`` ->
    {image, image2 (3,S,S), language_tokens (T,), padding_mask (T,), label}."""

    required = ("image_path", "image2_path", "text_segment", "label")

    def load(self, item: dict[str, Any], index: int) -> dict[str, Any]:
        ids, pad, _ = self._text(item)
        return {"image": self._image(item["image_path"], item), "image2": self._image(item["image2_path"], item),
                "language_tokens": ids, "padding_mask": pad, "label": int(item["label"])}


@torch.no_grad()
def judge(pred: Predictor, image_a: str | Path, image_b: str | Path, statement: str) -> Result:
    """Is ``statement`` true of the image pair? One row ``{"image_a", "image_b", "statement", "true", "prob_true"}``."""
    require(pred, NLVR2, tokenizer=True)
    result = Result()
    pair = list_images([image_a, image_b])
    tensors, ok, errors = read_images(pair, pred.transform)
    result.errors.extend(errors)
    if len(ok) < 2:
        return result
    ids, pad = encode_texts(pred, [statement])
    a, b = (t.unsqueeze(0).to(pred.device) for t in tensors)
    batch = {"image": a, "image2": b, "language_tokens": ids, "padding_mask": pad}
    prob = pred.downstream._logits(pred.model, batch).float().softmax(-1)[0, 1].item()
    result.rows.append({"image_a": str(pair[0]), "image_b": str(pair[1]), "statement": statement, "true": prob > 0.5,
                        "prob_true": round(prob, 4)})
    return result


def _judge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image_a")
    parser.add_argument("image_b")
    parser.add_argument("--statement", required=True)


def _judge_run(args: argparse.Namespace, pred: Predictor) -> int:
    return print_result(judge(pred, args.image_a, args.image_b, args.statement), args.json, args.strict)


class NLVR2(DownstreamTask):
    """NLVR2: each image fused with the statement, the two [CLS] concatenated -> 2-layer MLP -> true/false;
    cross-entropy; accuracy."""

    name = "nlvr2"
    head = "nlvr2"
    metric, metric_label = "acc", "accuracy"
    splits = INDEX_FILES["nlvr2"]
    recipe = "finetune_nlvr2_base.yaml"
    image_blind_check = True
    predict_commands = (PredictCommand("nlvr2", "is a statement true of two images?", _judge_arguments, _judge_run),)

    def predict(self, predictor: Predictor, images: Any = None, text: Any = None, **options: Any) -> Result:
        """Is the statement ``text`` true of the pair ``images`` = (a, b)? One row ``{"true", "prob_true", ...}``."""
        if images is None or len(images) != 2 or not isinstance(text, str):
            raise TypeError("nlvr2 predict needs images=[image_a, image_b] and text= (the statement, a string)")
        return judge(predictor, images[0], images[1], text)

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        return NLVR2Dataset(data.data_dir, split, self.index_files(split), self.image_transform(split, data), tokenizer=data.tokenizer,
                            max_len=data.max_text_len, on_error=data.on_error)

    def num_classes(self, train_set: Dataset) -> int:
        return 2

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return model(image_a=batch["image"], image_b=batch["image2"], text_description=batch["language_tokens"],
                     padding_mask=batch["padding_mask"])

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        logits = self._logits(model, batch)
        return losses.classification_loss(logits, batch["label"]), {"acc": metrics.accuracy(logits.detach(), batch["label"]) / 100}

    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        return self.evaluate_accuracy(model, dataset, settings, self._logits)

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """Guessing true or false."""
        return 50.0


__all__ = ["NLVR2", "NLVR2Dataset", "judge"]
