"""The dense tasks' standard metrics: COCO box/mask AP (pycocotools), mIoU over a confusion matrix, seqeval entity F1."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from torch import Tensor

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ap(coco_gt: Any, results: list[dict[str, Any]], iou_type: Literal["bbox", "segm"] = "bbox") -> dict[str, float]:
    """COCO AP (x100) of ``results`` against the ground truth ``coco_gt`` (a pycocotools ``COCO``) with COCOeval.

    results: COCO result entries ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}`` (plus
    ``"segmentation"`` RLE for ``"segm"``). Returns AP (IoU .50:.95), AP50, AP75 and APs/APm/APl; scored over the
    images of ``coco_gt``; no results at all score 0 (COCOeval cannot load an empty list).
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type={iou_type!r}: expected 'bbox' or 'segm'")
    if not results:
        return dict.fromkeys(COCO_STATS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth; such a range scores 0 here.
    return {name: round(max(float(v), 0.0) * 100, 4) for name, v in zip(COCO_STATS, evaluator.stats[:6])}


class ConfusionMatrix:
    """Pixel counts per (true class, predicted class) with an ignore index; mIoU, mean accuracy and pixel accuracy.

    IoU_k = TP_k / (TP_k + FP_k + FN_k), acc_k = TP_k / (TP_k + FN_k); means run over the classes present in the
    ground truth (mmseg's ``nanmean``: a class never seen and never predicted is left out, one predicted but never
    seen scores IoU 0).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """pred, target: integer class maps of the same shape; pixels whose target is ``ignore_index`` are skipped."""
        pred = pred.cpu().numpy() if isinstance(pred, Tensor) else np.asarray(pred)
        target = target.cpu().numpy() if isinstance(target, Tensor) else np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
        keep = target != self.ignore_index
        t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
        if t.size and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"target holds class ids outside [0, {self.num_classes}) besides the ignore index {self.ignore_index}")
        self.counts += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def compute(self) -> dict[str, float]:
        """``{"mIoU", "mAcc", "aAcc"}`` in percent, plus ``"IoU"``: the per-class list (NaN for absent classes)."""
        tp = np.diag(self.counts).astype(np.float64)
        gt, predicted = self.counts.sum(1), self.counts.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            union = gt + predicted - tp
            iou = np.where(gt > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        total = self.counts.sum()
        return {"mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else 0.0,
                "mAcc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else 0.0,
                "aAcc": float(tp.sum() / total * 100) if total else 0.0,
                "IoU": [float(v * 100) for v in iou]}


def entity_f1(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]], scheme: str | None = None) -> dict[str, float]:
    """Entity-level precision, recall and F1 (x100) with seqeval (CoNLL's ``conlleval`` scoring: an entity counts
    when its type and span both match). ``scheme``: None = conlleval's lenient IOB reading, ``"IOB2"`` / ``"IOBES"``
    = strict mode of that scheme."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    kwargs: dict[str, Any] = {}
    if scheme is not None:
        from seqeval import scheme as schemes

        kwargs = {"mode": "strict", "scheme": getattr(schemes, scheme)}
    true, pred = [list(t) for t in true_tags], [list(p) for p in pred_tags]
    return {"f1": float(f1_score(true, pred, zero_division=0, **kwargs)) * 100,
            "precision": float(precision_score(true, pred, zero_division=0, **kwargs)) * 100,
            "recall": float(recall_score(true, pred, zero_division=0, **kwargs)) * 100}


__all__ = ["COCO_STATS", "ConfusionMatrix", "coco_ap", "entity_f1"]
