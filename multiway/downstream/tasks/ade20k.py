"""ADE20K semantic segmentation: UperNet over the BEiT pyramid; mIoU (also mean accuracy, pixel accuracy), sliding
windows at evaluation, ``reduce_zero_label``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...constants import VL_MEAN, VL_STD
from ...dense.data import ADE20KDataset
from ...dense.metrics import ConfusionMatrix
from ...dense.segmentation import IGNORE_INDEX, slide_inference
from ..inference import Predictor, Result, list_images, print_result, require
from .base import DataSettings, DownstreamTask, EvalSettings, PredictCommand

# Folders that may hold images/ and annotations/, relative to data_dir (the official archive's, then the built-in data's).
ADE_ROOTS = ("", "ADEChallengeData2016", "ade20k")


@dataclass
class ADE20KOptions:
    """Segmentation settings (BEiT's recipe: UperNet 768 channels, auxiliary FCN 256 at weight 0.4, 512 or 640 crops,
    slide stride 341 / 426, i.e. 2/3 of the crop)."""

    num_classes: int = 0  # 0: the largest class id of the training labels + 1 (ADE20K: 150)
    reduce_zero_label: bool = True
    channels: int = 768
    aux_channels: int = 256
    aux_weight: float = 0.4
    input_scale: float = 1.0  # each crop is resized by this before the encoder (small objects: more patches each)
    stride_fraction: float = 2 / 3  # sliding-window stride as a fraction of the crop (the crop is the input size)


def _normalize(image: Tensor) -> Tensor:
    mean = torch.tensor(VL_MEAN, device=image.device).view(-1, 1, 1)
    std = torch.tensor(VL_STD, device=image.device).view(-1, 1, 1)
    return (image - mean) / std


@torch.no_grad()
def segment(pred: Predictor, inputs: list[str], out_dir: str) -> Result:
    """Segment every image: ``out_dir/masks/<name>.png`` (class ids), ``out_dir/pictures/<name>.png`` (classes drawn
    over the image) and ``out_dir/predictions.json`` (per image: the classes present and their pixel share); an
    unreadable image is reported by name and the rest processed."""
    from PIL import Image
    from torchvision.utils import draw_segmentation_masks

    from ...data.io import ImageError, load_image
    from ...dense.data import _image_tensor

    require(pred, "semanticsegmentation")
    out = Path(out_dir)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    result, entries = Result(), []
    crop = pred.model.config.img_size
    stride = max(1, int(crop * pred.downstream.options.stride_fraction))
    for path in list_images(inputs):
        try:
            image = _image_tensor(load_image(path))
        except ImageError as e:
            result.errors.append(str(e))
            continue
        scores = slide_inference(pred.model, _normalize(image.to(pred.device))[None], pred.model.num_classes, crop, stride)
        classes = scores[0].argmax(0).cpu()
        present = classes.unique().tolist()
        names = [pred.labels[c] if pred.labels else str(c) for c in present]
        masks = torch.stack([classes == c for c in present])
        picture = draw_segmentation_masks((image * 255).to(torch.uint8), masks, alpha=0.5)
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(out / "pictures" / f"{path.stem}.png")
        Image.fromarray(classes.numpy().astype(np.uint8), "L").save(out / "masks" / f"{path.stem}.png")
        share = {n: round(float((classes == c).float().mean()), 4) for n, c in zip(names, present)}
        entries.append({"file_name": str(path), "classes": share})
        result.rows.append({"path": str(path), "classes": ",".join(names)})
    (out / "predictions.json").write_text(json.dumps(entries, indent=1))
    return result


def _segment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder: predictions.json, masks/, pictures/")
    parser.add_argument("--labels", help="class names, one a line (default: ids)")


def _segment_run(args: argparse.Namespace, pred: Predictor) -> int:
    return print_result(segment(pred, args.inputs, args.out), args.json, args.strict)


class _Normalized(Dataset):
    """An ADE20K split with the images normalised (mean = std = 0.5), for the model."""

    def __init__(self, base: ADE20KDataset):
        self.base = base
        self.errors = base.errors

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        if "_skipped" in item:
            return item
        return {**item, "image": _normalize(item["image"])}


class ADE20K(DownstreamTask):
    """Semantic segmentation: UperNet (+ auxiliary FCN head) over four tapped blocks; cross-entropy with the ignore
    index; mIoU over a confusion matrix, evaluated with sliding windows of the input size over each whole image."""

    name = "ade20k"
    head = "semanticsegmentation"
    metric, metric_label = "mIoU", "mIoU"
    splits = {"train": ("images/training",), "val": ("images/validation",), "test": ("images/validation",)}
    Options = ADE20KOptions
    recipe = "finetune_ade20k_base.yaml"
    predict_commands = (PredictCommand("segment", "segment images into classes", _segment_arguments, _segment_run),)

    def eval_transform(self, img_size: int) -> Callable:
        from ...dense.data import _image_tensor

        return _image_tensor

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        self.index_files(split)
        root = next((Path(data.data_dir) / r for r in ADE_ROOTS if (Path(data.data_dir) / r / "images" / "training").is_dir()), None)
        if root is None:
            raise FileNotFoundError(f"ade20k: no images/ folder in {data.data_dir} or its {', '.join(r for r in ADE_ROOTS if r)}/")
        transform = None
        if split == "train":
            from torchvision.transforms import v2

            # random crops of data.crop_scale of the area resized to the input size (labels resized nearest)
            steps = [v2.RandomResizedCrop(data.img_size, scale=tuple(data.crop_scale), antialias=True)]
            transform = v2.Compose(steps + ([v2.RandomHorizontalFlip()] if data.hflip else []))
        return _Normalized(ADE20KDataset(root, split, transform, self.options.reduce_zero_label, data.on_error))

    def num_classes(self, train_set: Dataset) -> int:
        if self.options.num_classes:
            return self.options.num_classes
        largest = 0
        for _, label_path in train_set.base.pairs:
            label = train_set.base.read_label(label_path)
            valid = label[label != IGNORE_INDEX]
            largest = max(largest, int(valid.max()) if valid.size else 0)
        return largest + 1

    def build_model(self, source: Any, num_classes: int | None = None) -> nn.Module:
        import multiway

        overrides = {"preset": source} if isinstance(source, str) else dict(source)
        preset = overrides.pop("preset")
        o = self.options
        return multiway.create_model(f"{preset}_{self.head}", num_classes=num_classes or 150, channels=o.channels,
                                     aux_channels=o.aux_channels, aux_weight=o.aux_weight, input_scale=o.input_scale,
                                     **overrides)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        logits, loss = model(batch["image"], batch["label"])
        valid = batch["label"] != IGNORE_INDEX
        acc = (logits.detach().argmax(1)[valid] == batch["label"][valid]).float().mean() if valid.any() else logits.new_zeros(())
        return loss, {"pixel_acc": float(acc)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        net = getattr(model, "module", model)
        crop = net.config.img_size
        stride = max(1, int(crop * self.options.stride_fraction))
        device = next(model.parameters()).device
        matrix = ConfusionMatrix(net.num_classes, IGNORE_INDEX)
        try:
            for index in range(len(dataset)):  # whole images of any size, one at a time
                item = dataset[index]
                if "_skipped" in item:
                    continue
                scores = slide_inference(model, item["image"][None].to(device), net.num_classes, crop, stride)
                matrix.update(scores[0].argmax(0), item["label"])
        finally:
            model.train(was_training)
        result = matrix.compute()
        return {"mIoU": result["mIoU"], "mAcc": result["mAcc"], "aAcc": result["aAcc"]}

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """mIoU of predicting the most frequent training class at every pixel."""
        num_classes = self.num_classes(train_set)
        common = int(train_set.base.class_counts(num_classes).argmax())
        matrix = ConfusionMatrix(num_classes, IGNORE_INDEX)
        for _, label_path in test_set.base.pairs:
            label = test_set.base.read_label(label_path)
            matrix.update(np.full_like(label, common), label)
        return matrix.compute()["mIoU"]


__all__ = ["ADE20K", "ADE20KOptions", "segment"]
