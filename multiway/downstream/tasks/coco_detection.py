"""COCO object detection (box AP) and instance segmentation (mask AP): torchvision's Faster / Mask R-CNN on the
vision encoder plus a ViTDet or BEiT pyramid (:mod:`multiway.dense`)."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...dense.data import CocoInstances, collate_detection
from ...dense.metrics import coco_ap
from ..inference import Predictor, Result, list_images, print_result, require
from .base import DataSettings, DownstreamTask, EvalSettings, PredictCommand

# Per split: (annotation file, image folder) pairs relative to data_dir; the first that exists is read.
# The official layout (annotations/instances_train2017.json + train2017/) first, then the built-in data's.
COCO_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("annotations/instances_train2017.json", "train2017"), ("coco/instances_train.json", "")),
    "val": (("annotations/instances_val2017.json", "val2017"), ("coco/instances_val.json", "")),
    "test": (("annotations/instances_val2017.json", "val2017"), ("coco/instances_test.json", "")),
}


@dataclass
class CocoDetectionOptions:
    """Detection settings (the ViTDet / BEiT recipe at 1024 px: large-scale jitter 0.1-2.0, drop path and layer
    decay in the ``model`` / ``train`` sections)."""

    pyramid: str = "vitdet"  # "vitdet" (simple pyramid on the last block) or "beit" (4 tapped blocks + FPN)
    out_channels: int = 256  # pyramid width
    box_head_width: int = 1024
    mask_head_width: int = 256
    large_scale_jitter: bool = True  # training augmentation; off = flips only at the input size
    jitter_min: float = 0.1
    jitter_max: float = 2.0
    soft_nms: bool = False  # soft-NMS instead of hard NMS at inference
    detections_per_img: int = 100
    rpn_pre_nms_top_n_train: int = 2000  # RPN boxes per level into NMS (NMS dominates a tiny model's step on CPU)
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    anchor_scale: float = 8.0  # anchor size = this x the level's stride (ViTDet's 8; smaller for small objects)
    input_size: int = 0  # the detector's input side (torchvision's min/max size); 0: the model's img_size
    score_threshold: float = 0.5  # prediction on user files: detections drawn and written above this score


def _coco_results(dataset: CocoInstances, image_id: int, det: dict[str, Tensor], masks: bool) -> list[dict[str, Any]]:
    """One image's detections as COCO result entries (boxes xywh, masks as compressed RLE)."""
    from pycocotools import mask as mask_utils

    out = []
    boxes = det["boxes"].tolist()
    binary = (det["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8) if masks and "masks" in det else None
    for k, (box, label, score) in enumerate(zip(boxes, det["labels"].tolist(), det["scores"].tolist())):
        entry = {"image_id": image_id, "category_id": dataset.category_ids[label - 1], "score": round(float(score), 5),
                 "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)]}
        if binary is not None:
            rle = mask_utils.encode(np.asfortranarray(binary[k]))
            entry["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        out.append(entry)
    return out


@torch.no_grad()
def detect(pred: Predictor, inputs: list[str], out_dir: str, threshold: float = 0.5) -> Result:
    """Detect objects in every image: ``out_dir/predictions.json`` (COCO-style results with file names),
    ``out_dir/masks/<name>.png`` (instance ids, 0 = none) and ``out_dir/pictures/<name>.png`` (boxes, masks and
    labels drawn); an image that cannot be read is reported by name and the rest processed."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ...data.io import ImageError, load_image
    from ...dense.data import _image_tensor

    require(pred, "detection")
    out = Path(out_dir)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    result, entries = Result(), []
    for path in list_images(inputs):
        try:
            image = _image_tensor(load_image(path))
        except ImageError as e:
            result.errors.append(str(e))
            continue
        det = pred.model([image.to(pred.device)])[0]
        keep = det["scores"] >= threshold
        det = {k: v[keep].cpu() for k, v in det.items()}
        names = [pred.labels[i - 1] if pred.labels else str(i) for i in det["labels"].tolist()]
        picture = (image * 255).to(torch.uint8)
        ids = np.zeros(image.shape[1:], np.uint8)
        if "masks" in det and len(det["masks"]):
            binary = det["masks"][:, 0] > 0.5
            picture = draw_segmentation_masks(picture, binary, alpha=0.45)
            for k in range(len(binary) - 1, -1, -1):  # the best-scoring instance on top
                ids[binary[k].numpy()] = min(k + 1, 255)
        if len(det["boxes"]):
            labels = [f"{n} {s:.2f}" for n, s in zip(names, det["scores"].tolist())]
            picture = draw_bounding_boxes(picture, det["boxes"], labels=labels, colors="white")
        stem = path.stem
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(out / "pictures" / f"{stem}.png")
        Image.fromarray(ids, "L").save(out / "masks" / f"{stem}.png")
        for k, (box, name, score) in enumerate(zip(det["boxes"].tolist(), names, det["scores"].tolist())):
            entries.append({"file_name": str(path), "instance": k + 1, "category": name, "score": round(score, 4),
                            "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)]})
        result.rows.append({"path": str(path), "objects": len(names), "labels": ",".join(names)})
    (out / "predictions.json").write_text(json.dumps(entries, indent=1))
    return result


def _detect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder: predictions.json, masks/, pictures/")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--labels", help="class names, one a line (default: the run's)")


def _detect_run(args: argparse.Namespace, pred: Predictor) -> int:
    return print_result(detect(pred, args.inputs, args.out, args.threshold), args.json, args.strict)


class CocoDetection(DownstreamTask):
    """Object detection on COCO instances: Faster R-CNN; COCO box AP (AP, AP50, AP75, APs/m/l) via pycocotools.

    Classes are the annotation file's categories (C = their number; labels 1..C, 0 the background)."""

    name = "coco_detection"
    head = "detection"
    metric, metric_label = "box_AP", "box AP"
    splits = {split: tuple(f for f, _ in pairs) for split, pairs in COCO_FILES.items()}
    Options = CocoDetectionOptions
    recipe = "finetune_coco_detection_base.yaml"
    masks = False
    predict_commands = (PredictCommand("detect", "detect (and segment) objects in images", _detect_arguments, _detect_run),)

    def eval_transform(self, img_size: int) -> Callable:
        from ...dense.data import _image_tensor

        return _image_tensor  # the detector resizes and normalises itself

    def _files(self, split: str, data_dir: str) -> tuple[Path, Path]:
        self.index_files(split)  # names the valid splits
        for annotation, images in COCO_FILES[split]:
            if (Path(data_dir) / annotation).is_file():
                return Path(data_dir) / annotation, Path(data_dir) / images
        raise FileNotFoundError(f"{self.name} {split}: none of {[a for a, _ in COCO_FILES[split]]} found in {data_dir}")

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        from ...dense.detection import large_scale_jitter

        annotation, images = self._files(split, data.data_dir)
        o = self.options
        transform = None
        if split == "train":
            if o.large_scale_jitter:
                transform = large_scale_jitter(data.img_size, (o.jitter_min, o.jitter_max), data.hflip)
            elif data.hflip:
                from torchvision.transforms import v2

                transform = v2.RandomHorizontalFlip()
        return CocoInstances(annotation, images, transform, masks=self.masks, on_error=data.on_error)

    def collate(self, items):
        return collate_detection(items)

    def num_classes(self, train_set: Dataset) -> int:
        return train_set.num_classes

    def label_names(self, train_set: Dataset) -> list[str]:
        return list(train_set.names)

    def build_model(self, source: Any, num_classes: int | None = None) -> nn.Module:
        import multiway

        overrides = {"preset": source} if isinstance(source, str) else dict(source)
        preset = overrides.pop("preset")
        size = multiway.get_config(preset, **overrides).img_size
        o = self.options
        return multiway.create_model(
            f"{preset}_{self.head}", num_classes=num_classes or 80, masks=self.masks, pyramid=o.pyramid, out_channels=o.out_channels,
            min_size=o.input_size or size, max_size=o.input_size or size, soft_nms=o.soft_nms, detections_per_img=o.detections_per_img,
            box_head_width=o.box_head_width, mask_head_width=o.mask_head_width, rpn_pre_nms_top_n_train=o.rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=o.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train=o.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=o.rpn_post_nms_top_n_test, box_batch_size_per_image=o.box_batch_size_per_image,
            anchor_scale=o.anchor_scale, **overrides)

    def load_init(self, model: nn.Module, path: str) -> Any:
        import multiway

        return multiway.load_checkpoint(model, path)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        losses = model(batch["images"], batch["targets"])
        total = sum(losses.values())
        return total, {k.removeprefix("loss_"): float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        settings = settings or EvalSettings()
        was_training = model.training
        model.eval()
        results: list[dict[str, Any]] = []
        try:
            for batch in self.device_batches(model, dataset, settings):
                for image_id, det in zip(batch["image_ids"], model(batch["images"])):
                    results += _coco_results(dataset, image_id, {k: v.cpu() for k, v in det.items()}, self.masks)
        finally:
            model.train(was_training)
        path = self.output_path(settings, f"coco_results_{settings.split}.json")
        if path is not None:
            path.write_text(json.dumps(results))
        return self._score(dataset, results)

    def _score(self, dataset: CocoInstances, results: list[dict[str, Any]]) -> dict[str, float]:
        scores = {f"box_{k}": v for k, v in coco_ap(dataset.coco, results, "bbox").items()}
        if self.masks:
            scores.update({f"mask_{k}": v for k, v in coco_ap(dataset.coco, results, "segm").items()})
        return scores

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """The ground truth of a random training image given to each test image (its boxes, masks and classes)."""
        rng = random.Random(0)
        train_ids = [i for i in train_set.image_ids if train_set.annotations[i]]
        results = []
        for image_id in test_set.image_ids:
            info = test_set.coco.imgs[image_id]
            for ann in train_set.annotations[rng.choice(train_ids)]:
                if ann["category_id"] not in test_set.coco.cats:
                    continue
                entry = {"image_id": image_id, "category_id": ann["category_id"], "score": 1.0, "bbox": list(ann["bbox"])}
                if self.masks:
                    rle = train_set.coco.annToRLE(ann)
                    if list(rle["size"]) != [info["height"], info["width"]]:
                        continue
                    entry["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")
                                             if isinstance(rle["counts"], bytes) else rle["counts"]}
                results.append(entry)
        return self._score(test_set, results)[self.metric]


class CocoInstanceSegmentation(CocoDetection):
    """Instance segmentation on COCO instances: Mask R-CNN; COCO mask AP (and box AP) via pycocotools."""

    name = "coco_instance_segmentation"
    metric, metric_label = "mask_AP", "mask AP"
    recipe = "finetune_coco_instance_segmentation_base.yaml"
    masks = True


__all__ = ["COCO_FILES", "CocoDetection", "CocoDetectionOptions", "CocoInstanceSegmentation", "detect"]
