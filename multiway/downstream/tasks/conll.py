"""Sequence labelling (NER, chunking) on CoNLL-format files through the language encoder; seqeval entity F1."""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...dense.data import ConllDataset, align_labels, word_predictions
from ...dense.metrics import entity_f1
from ..inference import Predictor, Result, print_result, require
from .base import DataSettings, DownstreamTask, EvalSettings, PredictCommand


@dataclass
class ConllOptions:
    """CoNLL settings: which column holds the tags (-1: the last, CoNLL-2003's NER; 2 for its chunks)."""

    tag_column: int = -1
    dropout: float = 0.1
    train_sentences: int = 0  # few-shot runs: train on N training sentences drawn with subset_seed (0: all)
    subset_seed: int = 0


@torch.no_grad()
def tag_sentences(pred: Predictor, sentences: Sequence[str], batch_size: int = 64) -> Result:
    """Tag every sentence (words split on whitespace, as in CoNLL files): rows ``{"text", "tags": [[word, tag], ...],
    "entities": [[type, "words"], ...]}`` (entities by seqeval's IOB reading of the tags)."""
    from seqeval.metrics.sequence_labeling import get_entities

    require(pred, Conll.head, tokenizer=True)
    names = pred.labels or [str(i) for i in range(pred.model.num_classes)]
    result = Result()
    for start in range(0, len(sentences), batch_size):
        chunk = [text.split() for text in sentences[start : start + batch_size]]
        rows = [align_labels(words, ["O"] * len(words), pred.tokenizer, {"O": 0}, pred.max_text_len) for words in chunk]
        ids, pad, _, word_of = (torch.tensor([row[k] for row in rows]) for k in range(4))
        logits, _ = pred.model(ids.to(pred.device), pad.to(pred.device))
        for words, tags in zip(chunk, word_predictions(logits.cpu(), word_of, [len(w) for w in chunk], names)):
            entities = [[kind, " ".join(words[first : last + 1])] for kind, first, last in get_entities(tags)]
            result.rows.append({"text": " ".join(words), "tags": [list(pair) for pair in zip(words, tags)], "entities": entities})
    return result


def _tag_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", help="a text file, one sentence a line")
    parser.add_argument("--labels", help="tag names, one a line (default: the run's)")


def _tag_run(args: argparse.Namespace, pred: Predictor) -> int:
    texts = [t for t in Path(args.texts).read_text(encoding="utf-8").splitlines() if t.strip()]
    return print_result(tag_sentences(pred, texts), args.json, args.strict)


class _Subset(Dataset):
    """``count`` sentences of ``base`` drawn without replacement with ``seed`` (a draw over the whole file, so a few
    sentences still come from many scenes), in file order."""

    def __init__(self, base: ConllDataset, count: int, seed: int = 0):
        self.base = base
        self.indices = sorted(random.Random(seed).sample(range(len(base)), min(count, len(base))))
        self.tag_names, self.errors = base.tag_names, base.errors
        self.sentences = [base.sentences[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[self.indices[index]]


class Conll(DownstreamTask):
    """Token classification: each word's tag on its first subword (the others and the specials ignored), cross-
    entropy; entity F1 (seqeval, conlleval's matching) over words. Tags are the training split's, saved in task.json."""

    name = "conll"
    head = "tokenclassification"
    metric, metric_label = "f1", "entity F1"
    splits = {"train": ("eng.train", "conll/train.txt", "train.txt"), "val": ("eng.testa", "conll/val.txt", "val.txt"),
              "test": ("eng.testb", "conll/test.txt", "test.txt")}
    Options = ConllOptions
    recipe = "finetune_conll_base.yaml"
    find_unused_parameters = True  # the vision experts get no gradient
    predict_commands = (PredictCommand("tag", "tag the words of sentences (one a line): NER / chunk tags", _tag_arguments, _tag_run),)

    def predict(self, predictor: Predictor, images: Any = None, text: Any = None, **options: Any) -> Result:
        """Tags of ``text`` (a sentence or a list): rows ``{"text", "tags", "entities"}``."""
        if text is None:
            raise TypeError(f"{self.name} predict needs text=")
        return tag_sentences(predictor, [text] if isinstance(text, str) else list(text), **options)

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        found = [Path(data.data_dir) / f for f in self.index_files(split) if (Path(data.data_dir) / f).is_file()]
        if not found:
            raise FileNotFoundError(f"conll {split}: none of {list(self.index_files(split))} found in {data.data_dir}")
        if data.tokenizer is None:
            raise ValueError("conll needs a text tokenizer (--tokenizer)")
        dataset = ConllDataset(found[0], data.tokenizer, data.labels, self.options.tag_column, data.max_text_len, data.on_error)
        if split == "train" and self.options.train_sentences:
            return _Subset(dataset, self.options.train_sentences, self.options.subset_seed)
        return dataset

    def collate(self, items):
        batch = {k: torch.stack([i[k] for i in items]) for k in ("language_tokens", "padding_mask", "labels", "word_of")}
        batch["num_words"] = [i["num_words"] for i in items]
        batch["batch_size"] = len(items)
        return batch

    def num_classes(self, train_set: Dataset) -> int:
        return len(train_set.tag_names)

    def label_names(self, train_set: Dataset) -> list[str]:
        return list(train_set.tag_names)

    def build_model(self, source: Any, num_classes: int | None = None) -> nn.Module:
        import multiway

        overrides = {"preset": source} if isinstance(source, str) else dict(source)
        preset = overrides.pop("preset")
        return multiway.create_model(f"{preset}_{self.head}", num_classes=num_classes or 9, dropout=self.options.dropout, **overrides)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        logits, loss = model(batch["language_tokens"], batch["padding_mask"], batch["labels"])
        scored = batch["labels"] != -100
        acc = (logits.detach().argmax(-1)[scored] == batch["labels"][scored]).float().mean()
        return loss, {"tag_acc": float(acc)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        settings = settings or EvalSettings()
        was_training = model.training
        model.eval()
        names = dataset.tag_names
        predicted = []
        try:
            for batch in self.device_batches(model, dataset, settings):
                logits, _ = model(batch["language_tokens"], batch["padding_mask"])
                predicted += word_predictions(logits.cpu(), batch["word_of"].cpu(), batch["num_words"], names)
        finally:
            model.train(was_training)
        true = [tags for _, tags in dataset.sentences]
        return entity_f1(true, predicted)

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """Entity F1 of tags drawn at random with the training split's tag frequencies."""
        rng = random.Random(0)
        sentences = train_set.sentences
        pool = [t for _, tags in sentences for t in tags]
        true = [tags for _, tags in test_set.sentences]
        return entity_f1(true, [[rng.choice(pool) for _ in tags] for tags in true])["f1"]


__all__ = ["Conll", "ConllOptions", "tag_sentences"]
