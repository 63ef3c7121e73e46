"""VQAv2 visual question answering: classification over the answer vocabulary with soft VQA scores."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...constants import INDEX_FILES, VQA_ANSWER_FILE
from ...data.index_dataset import IndexDataset
from ...data.io import DataError
from ...data.raw_indexes import read_answer2label
from .. import losses, metrics
from ..inference import Predictor, Result, encode_texts, image_batches, list_images, print_result, require
from .base import DataSettings, DownstreamTask, EvalSettings, PredictCommand

VQA_NUM_LABELS = 3129  # the official head size, used when the data folder has no answer2label.txt


class VQAv2Dataset(IndexDataset):
    """``vqa.*.jsonl`` lines ``{image_path, text_segment, labels, scores, qid}`` + ``answer2label.txt``.

    Yields {image (3,S,S), language_tokens (T,), padding_mask (T,), qid} plus ``labels`` (float[num_labels] soft
    scores) when the item has labels (train/val; the official test files have none).
    """

    required = ("image_path", "text_segment", "qid")

    def __init__(self, *args: Any, num_labels: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        a2l = self.data_dir / VQA_ANSWER_FILE
        self.answer2label = read_answer2label(a2l) if a2l.is_file() else {}
        self.label2answer = {v: k for k, v in self.answer2label.items()}
        self.num_labels = num_labels or (len(self.answer2label) or VQA_NUM_LABELS)

    def load(self, item: dict[str, Any], index: int) -> dict[str, Any]:
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


@torch.no_grad()
def answer(pred: Predictor, inputs: Iterable[str], question: str, topk: int = 3, batch_size: int = 16) -> Result:
    """Answer ``question`` about every image: rows ``{"path", "question", "answer", "top": [[answer, prob], ...]}``."""
    require(pred, VQAv2, tokenizer=True, labels=True)
    result = Result()
    for images, ok in image_batches(pred, list_images(inputs), batch_size, result):
        ids, pad = encode_texts(pred, [question] * len(ok))
        batch = {"image": images, "language_tokens": ids, "padding_mask": pad}
        probs = pred.downstream._logits(pred.model, batch).float().sigmoid()
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        for p, vals, idx in zip(ok, top.values, top.indices):
            pairs = [[pred.labels[i], round(v, 4)] for v, i in zip(vals.tolist(), idx.tolist())]
            result.rows.append({"path": str(p), "question": question, "answer": pairs[0][0], "top": pairs})
    return result


def _vqa_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--question", required=True)
    parser.add_argument("--labels", help="answer2label.txt (default: the run's)")
    parser.add_argument("--topk", type=int, default=3)


def _vqa_run(args: argparse.Namespace, pred: Predictor) -> int:
    return print_result(answer(pred, args.inputs, args.question, topk=args.topk), args.json, args.strict)


class VQAv2(DownstreamTask):
    """VQAv2: the fused [CLS] of image + question -> pooler -> 2-layer MLP over the answers; the official loss
    (BCE with the soft scores, summed over answers) and the VQA score. Splits without labels (test, test-dev)
    write the submission json ``submit_vqav2_<split>.json`` into the evaluation's ``out_dir``."""

    name = "vqav2"
    head = "vqav2"
    metric, metric_label = "vqa_score", "VQA score"
    splits = INDEX_FILES["vqav2"]
    recipe = "finetune_vqav2_base.yaml"
    image_blind_check = True
    predict_commands = (PredictCommand("vqa", "answer a question about images", _vqa_arguments, _vqa_run),)

    def predict(self, predictor: Predictor, images: Any = None, text: Any = None, **options: Any) -> Result:
        """Answers to the question ``text`` about each of ``images``: rows ``{"path", "question", "answer", "top"}``."""
        if images is None or not isinstance(text, str):
            raise TypeError("vqav2 predict needs images= and text= (the question, a string)")
        return answer(predictor, images, text, **options)

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        return VQAv2Dataset(data.data_dir, split, self.index_files(split), self.image_transform(split, data), tokenizer=data.tokenizer,
                            max_len=data.max_text_len, on_error=data.on_error)

    def num_classes(self, train_set: Dataset) -> int:
        return train_set.num_labels

    def label_names(self, train_set: Dataset) -> list[str]:
        return [train_set.label2answer[i] for i in range(len(train_set.label2answer))]

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """Answer logits (B, C) of a batch's images and questions."""
        return model(image=batch["image"], question=batch["language_tokens"], padding_mask=batch["padding_mask"])

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        logits = self._logits(model, batch)
        return losses.vqa_loss(logits, batch["labels"]), {"score": metrics.vqa_score(logits.detach(), batch["labels"]) / 100}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        settings = settings or EvalSettings()

        def outputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
            return {"logits": self._logits(model, batch).float(), **{k: batch[k] for k in ("labels", "qid") if k in batch}}

        out = self.gather_outputs(model, dataset, settings, outputs)
        logits_t = out["logits"]
        result: dict[str, float] = {}
        if "labels" in out:
            result["vqa_score"] = metrics.vqa_score(logits_t, out["labels"])
            return result
        path = self.output_path(settings, f"submit_vqav2_{settings.split}.json")
        if path is not None and "qid" in out:
            answers = [dataset.label2answer[i] for i in range(len(dataset.label2answer))]
            metrics.write_vqa_submission(out["qid"].tolist(), logits_t.argmax(-1).tolist(), answers, str(path))
        return result

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """Expected VQA score of a uniformly random answer: the mean soft score mass per question over C."""
        total = sum(sum(i.get("scores") or []) for i in test_set.items)
        return 100.0 * total / max(1, len(test_set.items)) / train_set.num_labels


__all__ = ["VQA_NUM_LABELS", "VQAv2", "VQAv2Dataset", "answer"]
