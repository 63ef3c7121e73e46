"""Training memory of Mask R-CNN beyond the backbone: the pyramid and torchvision's heads, measured on CPU.

    python benchmarks/detector_memory.py --img-size 1024 --batches 1 2 --out benchmarks/results/detector_heads_memory_cpu.json

``multiway plan`` runs under fake tensors, which have shapes but no values. torchvision's detector decides sizes
from values: the transform picks a resize with ``.item()``, the RPN keeps the proposals that survive
``remove_small_boxes`` and ``batched_nms``, the RoI sampler draws positives and negatives with ``torch.where`` on
IoU matches, the mask head runs on the positive RoIs only. Fake tensors stop at the first of these
(``DataDependentOutputException: aten._local_scalar_dense``), so the planner cannot trace the detector.

This script measures the rest with real tensors instead: one Mask R-CNN training step (forward, the four loss
terms, backward) with a **one-block** backbone of the model's width at the full resolution, so the pyramid
(ViTDet's deconvolutions from D channels), the RPN over all five levels and the RoI heads have their real sizes,
under PyTorch's ``MemTracker``. The same tracker also measures the one-block backbone's own dense step (the
planner's ``dense`` task, real tensors); the difference is what the pyramid and the heads add. Adding it to the
planner's fake-tensor plan of the whole backbone gives the detector's peak, to within the error of adding two
peaks (they are reached at about the same moment, the start of backward). fp32 only: the CPU's bf16
convolutions are too slow here; bf16 autocast roughly halves the heads' activation bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.distributed._tools.mem_tracker import MemTracker

import multiway
from multiway.dense.detection import build_detector
from multiway.planning import PlanConfig, plan


def _targets(batch: int, img_size: int, boxes_per_image: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """COCO-like targets: ``boxes_per_image`` boxes of 2-40% of the side, with their box masks."""
    targets = []
    for _ in range(batch):
        size = (torch.rand(boxes_per_image, 2, generator=generator) * 0.38 + 0.02) * img_size
        corner = torch.rand(boxes_per_image, 2, generator=generator) * (img_size - size)
        boxes = torch.cat([corner, corner + size], dim=1)
        masks = torch.zeros(boxes_per_image, img_size, img_size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
            m[y0:y1, x0:x1] = 1
        labels = torch.randint(1, 81, (boxes_per_image,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return targets


def _tracked(module: torch.nn.Module, step) -> dict:
    """Peak and saved-activation bytes of ``step()`` (forward returning a loss; backward here) under MemTracker."""
    tracker = MemTracker()
    tracker.track_external(module)
    with tracker:
        loss = step()
        current = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
        activation = int(next(v for k, v in current.items() if str(getattr(k, "value", k)) == "Activation"))
        loss.backward()
    peak = int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
    return {"peak_bytes": peak, "activation_bytes": activation}


def one_block_steps(preset: str, img_size: int, batch: int, boxes_per_image: int) -> dict:
    """One Mask R-CNN training step on a one-block backbone of ``preset``'s width, and that backbone's own dense step
    (the planner's: the map a ViTDet pyramid reads, squared and averaged), both with real tensors."""
    torch.manual_seed(0)
    backbone = multiway.create_model(preset, depth=1, img_size=img_size, window_size=14, global_attention_interval=3).train()
    detector = build_detector(backbone, num_classes=80, min_size=img_size, max_size=img_size).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, img_size, img_size, generator=g) for _ in range(batch)]
    targets = _targets(batch, img_size, boxes_per_image, g)
    roi_heads = detector.detector.roi_heads
    positives: list[int] = []
    select = roi_heads.select_training_samples

    def counting_select(proposals, targets):  # the positive RoIs per image: what the mask head runs on
        out = select(proposals, targets)
        positives.extend(int((labels > 0).sum()) for labels in out[2])
        return out

    roi_heads.select_training_samples = counting_select
    full = _tracked(detector, lambda: sum(detector(images, targets).values()))
    stacked = torch.stack(images)
    alone = _tracked(backbone, lambda: backbone.forward_intermediates(stacked, indices=[0], intermediates_only=True)[0].square().mean())
    head_params = sum(p.numel() for p in detector.parameters()) - sum(p.numel() for p in backbone.parameters())
    return {"detector": full, "backbone": alone, "positive_rois_per_image": positives, "head_and_pyramid_params": head_params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="beit3_base_patch16_224")
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--boxes-per-image", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for batch in a.batches:
        started = time.process_time()
        measured = one_block_steps(a.preset, a.img_size, batch, a.boxes_per_image)
        # what the pyramid and heads add to a step: the difference of the two peaks, plus their AdamW states
        added = measured["detector"]["peak_bytes"] - measured["backbone"]["peak_bytes"] + 8 * measured["head_and_pyramid_params"]
        backbone = plan(PlanConfig(model=a.preset, task="dense", img_size=a.img_size, batch=batch, precision="fp32"))
        row = {"batch": batch, **measured, "heads_add_bytes": added, "backbone_plan_peak_bytes": backbone.peak_bytes_per_rank,
               "detector_estimate_peak_bytes": backbone.peak_bytes_per_rank + added, "cpu_seconds": time.process_time() - started}
        rows.append(row)
        print(json.dumps(row))
    if a.out:
        meta = {"preset": a.preset, "img_size": a.img_size, "boxes_per_image": a.boxes_per_image, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": f"{os.cpu_count()} cores"}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
