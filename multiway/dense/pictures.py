"""A picture grid of dense predictions on test images: instance masks and boxes, semantic maps, beside the truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def plot_dense_examples(detection_run: Path | None, segmentation_run: Path | None, data: Path, path: Path, n: int = 6,
                        threshold: float = 0.2, max_detections: int = 4, zoom: int = 4) -> None:
    """Rows of ``n`` built-in test images: the image; the detector's boxes, masks, labels and scores (the best
    ``max_detections`` scoring at least ``threshold`` after NMS across classes; a tiny detector's scores stay well
    under 0.5); the segmenter's class map; the true class map. Runs are ``multiway finetune`` folders (either may
    be None). Detections are drawn on the image enlarged ``zoom`` times, so that labels stay readable on 32-px
    scenes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    from torchvision.ops import nms
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ..data.io import load_image
    from ..downstream.inference import load_predictor
    from ..downstream.tasks.ade20k import _normalize
    from .builtin import SEGMENTATION_CLASSES
    from .data import _image_tensor
    from .segmentation import slide_inference

    scenes = [json.loads(line) for line in (data / "scenes.test.jsonl").read_text().splitlines() if line.strip()][:n]
    images = [_image_tensor(load_image(data / s["image_path"])) for s in scenes]
    rows: list[tuple[str, list[np.ndarray]]] = [("image", [(im * 255).byte().permute(1, 2, 0).numpy() for im in images])]
    if detection_run is not None:
        det = load_predictor(detection_run, device="cpu")
        pictures = []
        for image in images:
            out = det.model([image])[0]
            # one label per object in the picture: the best class of overlapping boxes (NMS across classes)
            keep = nms(out["boxes"], out["scores"], 0.5)
            keep = keep[out["scores"][keep] >= threshold][:max_detections]
            picture = (image * 255).to(torch.uint8).repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
            if "masks" in out and len(keep):
                masks = out["masks"][keep, 0].repeat_interleave(zoom, 1).repeat_interleave(zoom, 2) > 0.5
                picture = draw_segmentation_masks(picture, masks, alpha=0.5)
            labels = [f"{det.labels[i - 1] if det.labels else i} {score:.2f}"
                      for i, score in zip(out["labels"][keep].tolist(), out["scores"][keep].tolist())]
            if len(keep):
                picture = draw_bounding_boxes(picture, out["boxes"][keep] * zoom, labels=labels, colors="white")
            pictures.append(picture.permute(1, 2, 0).numpy())
        rows.append(("detected", pictures))
    palette = plt.get_cmap("tab10")
    colour = lambda classes: (np.array([palette(c % 10)[:3] for c in range(len(SEGMENTATION_CLASSES) + 1)])[classes] * 255).astype(np.uint8)  # noqa: E731
    if segmentation_run is not None:
        seg = load_predictor(segmentation_run, device="cpu")
        crop = seg.model.config.img_size
        stride = max(1, int(crop * seg.downstream.options.stride_fraction))
        maps = [slide_inference(seg.model, _normalize(im)[None], seg.model.num_classes, crop, stride)[0].argmax(0).numpy() for im in images]
        rows.append(("segmented", [colour(m) for m in maps]))
        truth = []
        for scene in scenes:
            label = np.asarray(Image.open(data / "ade20k" / "annotations" / "validation" / Path(scene["image_path"]).name), dtype=np.int64)
            truth.append(colour(np.where(label == 0, len(SEGMENTATION_CLASSES), label - 1)))  # the rim in its own colour
        rows.append(("true classes", truth))
    fig, axes = plt.subplots(len(rows), len(images), figsize=(1.8 * len(images), 1.9 * len(rows)), squeeze=False)
    for r, (title, pictures) in enumerate(rows):
        for c, picture in enumerate(pictures):
            axes[r][c].imshow(picture)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=8)
    if segmentation_run is not None:  # the colour key of the class maps
        from matplotlib.patches import Patch

        key = [Patch(color=palette(c % 10), label=name) for c, name in enumerate(SEGMENTATION_CLASSES)]
        key.append(Patch(color=palette(len(SEGMENTATION_CLASSES) % 10), label="rim (ignored)"))
        fig.legend(handles=key, loc="lower center", ncol=len(key), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["plot_dense_examples"]
