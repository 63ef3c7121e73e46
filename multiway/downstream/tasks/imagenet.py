"""ImageNet-1k image classification through the vision encoder (BEiT3ForImageClassification), top-1/top-5."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...constants import IMAGENET_MEAN, IMAGENET_STD, INDEX_FILES
from ...data.index_dataset import IndexDataset
from .. import losses, metrics
from ..inference import Predictor, Result, image_batches, list_images, print_result, require
from .base import DataSettings, DownstreamTask, EvalSettings, PredictCommand


class ImageNetDataset(IndexDataset):
    """``imagenet.{train,val}.index.jsonl`` lines ``{image_path, label}`` -> {image (3,S,S), label int}."""

    required = ("image_path", "label")

    def load(self, item: dict[str, Any], index: int) -> dict[str, Any]:
        return {"image": self._image(item["image_path"], item), "label": int(item["label"])}


@dataclass
class ImageNetOptions:
    """ImageNet's own settings (the official recipe: label smoothing 0.1, mixup 0.8, cutmix 1.0, RandAugment)."""

    label_smoothing: float = 0.0  # cross-entropy label smoothing (with mixup/cutmix it goes into the soft targets)
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    # True: timm's training transform (RandAugment rand-m9-mstd0.5-inc1, random erasing, colour jitter 0.4);
    # False: the vision-language crop-and-flip views (crop_scale, hflip) with ImageNet's normalisation
    auto_augment: bool = True


@torch.no_grad()
def classify(pred: Predictor, inputs: Iterable[str], topk: int = 5, batch_size: int = 32) -> Result:
    """Classify every image: rows ``{"path", "label", "top": [[name, prob], ...]}`` (names are ids without labels)."""
    require(pred, ImageNet.head)
    result = Result()
    for images, ok in image_batches(pred, list_images(inputs), batch_size, result):
        probs = pred.model(image=images).float().softmax(-1)
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        for p, vals, idx in zip(ok, top.values, top.indices):
            names = [pred.labels[i] if pred.labels else str(i) for i in idx.tolist()]
            pairs = [[n, round(v, 4)] for n, v in zip(names, vals.tolist())]
            result.rows.append({"path": str(p), "label": pairs[0][0], "top": pairs})
    return result


def _classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--labels", help="class names, one a line (default: ids)")
    parser.add_argument("--topk", type=int, default=5)


def _classify_run(args: argparse.Namespace, pred: Predictor) -> int:
    return print_result(classify(pred, args.inputs, topk=args.topk), args.json, args.strict)


class ImageNet(DownstreamTask):
    """Image classification: mean-pooled patch tokens -> linear classifier; cross-entropy (soft targets under
    mixup/cutmix); top-1 and top-5 accuracy. Classes are the index's integer labels (C = max label + 1)."""

    name = "imagenet"
    head = "imageclassification"
    metric, metric_label = "acc@1", "top-1 acc"
    normalize = "imagenet"
    splits = INDEX_FILES["imagenet"]
    Options = ImageNetOptions
    recipe = "finetune_imagenet_base.yaml"
    predict_commands = (PredictCommand("classify", "classify images", _classify_arguments, _classify_run),)

    def predict(self, predictor: Predictor, images: Any = None, text: Any = None, **options: Any) -> Result:
        """Labels of ``images``: rows ``{"path", "label", "top"}`` (option: topk)."""
        if images is None:
            raise TypeError(f"{self.name} predict needs images=")
        return classify(predictor, images, **options)

    def preprocessing(self, img_size: int, max_text_len: int = 64) -> dict[str, Any]:
        """ImageNet evaluation: Resize(S) + CenterCrop(S), ImageNet mean/std."""
        return {**super().preprocessing(img_size, max_text_len), "resize": "center_crop"}

    def eval_transform(self, img_size: int) -> Callable:
        from ...data.transforms import build_imagenet_transform

        return build_imagenet_transform(False, img_size)

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        from ...data.transforms import build_imagenet_transform, build_transform

        if split != "train":
            transform = self.eval_transform(data.img_size)
        elif self.options.auto_augment:
            transform = build_imagenet_transform(True, data.img_size)
        else:
            transform = build_transform("", is_train=True, img_size=data.img_size, crop_scale=data.crop_scale, hflip=data.hflip,
                                        mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return ImageNetDataset(data.data_dir, split, self.index_files(split), transform, on_error=data.on_error)

    def num_classes(self, train_set: Dataset) -> int:
        return max(int(i["label"]) for i in train_set.items) + 1

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        image, target = batch["image"], batch["label"]
        if model.training and (self.options.mixup > 0 or self.options.cutmix > 0):
            if image.shape[0] % 2:
                raise ValueError(f"mixup/cutmix need an even batch size, got {image.shape[0]}")
            image, target = self._mixup(getattr(model, "module", model).num_classes)(image, target)
        logits = model(image=image)
        loss = losses.classification_loss(logits, target, self.options.label_smoothing)
        return loss, {"acc": metrics.accuracy(logits.detach(), target) / 100}

    def _mixup(self, num_classes: int):
        """timm's Mixup for ``num_classes`` (built once)."""
        if getattr(self, "_mixup_fn", None) is None:
            from timm.data import Mixup

            o = self.options
            self._mixup_fn = Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, label_smoothing=o.label_smoothing, num_classes=num_classes)
        return self._mixup_fn

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        out = self.gather_outputs(model, dataset, settings or EvalSettings(),
                                  lambda model, batch: {"logits": model(image=batch["image"]).float(), "label": batch["label"]})
        return metrics.topk_accuracy(out["logits"], out["label"], ks=(1, 5))

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """Uniform guessing over the training split's classes."""
        return 100.0 / len({int(i["label"]) for i in train_set.items})


__all__ = ["ImageNet", "ImageNetDataset", "ImageNetOptions", "classify"]
