"""Object detection and instance segmentation: torchvision's Mask R-CNN / Faster R-CNN on the multiway backbone.

The detector itself is torchvision's (RPN, RoI heads, box coder, losses, mask head); multiway supplies the backbone
(:class:`~multiway.dense.pyramid.DenseBackbone`: the vision encoder plus a ViTDet or BEiT pyramid) and sets the
parts that depend on that pyramid:

* anchors: one size per level, 8 x the level's stride (32 .. 512 px for patch 16, ViTDet/FPN; ``anchor_scale``
  changes the 8), ratios 0.5, 1, 2;
* RoIAlign: ``MultiScaleRoIAlign`` over p2..p5 (p6 feeds the RPN only), 7x7 boxes and 14x14 masks, sampling 2;
* padding: inputs padded to a multiple of the p5 stride (2 x patch).

Soft-NMS (Bodla et al. 2017) at inference is :func:`soft_nms`, a small implementation on ``torchvision.ops.box_iou``
(torchvision has hard NMS only). The paper's Cascade R-CNN head has no torchvision counterpart and is not built.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, box_iou

from ..constants import VL_MEAN, VL_STD
from ..model.multiway import MultiwayTransformer
from .pyramid import LEVELS, DenseBackbone


def soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor, sigma: float = 0.5, method: Literal["gaussian", "linear"] = "gaussian",
             iou_threshold: float = 0.3, score_threshold: float = 0.001) -> tuple[Tensor, Tensor]:
    """Soft-NMS per class: instead of removing the boxes that overlap a kept one, decay their scores.

    Greedy: take the highest-scoring remaining box, then multiply the score of every other box of its class by
    ``exp(-iou^2 / sigma)`` (gaussian) or ``1 - iou`` where ``iou > iou_threshold`` (linear); drop boxes below
    ``score_threshold``. boxes (N, 4) xyxy, scores (N,), labels (N,) -> (kept indices (K,), new scores (K,)), by
    descending new score.
    """
    if method not in ("gaussian", "linear"):
        raise ValueError(f"method={method!r}: expected 'gaussian' or 'linear'")
    scores = scores.clone().float()
    iou = box_iou(boxes.float(), boxes.float())
    same_class = labels[:, None] == labels[None, :]
    alive = scores >= score_threshold
    order: list[int] = []
    while bool(alive.any()):
        best = int(torch.where(alive, scores, scores.new_tensor(-1.0)).argmax())
        order.append(best)
        alive[best] = False
        overlap = iou[best] * same_class[best]
        if method == "gaussian":
            decay = torch.exp(-(overlap**2) / sigma)
        else:
            decay = torch.where(overlap > iou_threshold, 1.0 - overlap, torch.ones_like(overlap))
        scores = torch.where(alive, scores * decay, scores)
        alive &= scores >= score_threshold
    keep = torch.tensor(order, dtype=torch.long, device=boxes.device)
    new = scores[keep]
    ranked = new.argsort(descending=True)
    return keep[ranked], new[ranked]


def anchor_sizes(patch_size: int, scale: float = 8.0) -> tuple[tuple[int], ...]:
    """One anchor size per level p2..p6: ``scale`` x its stride (ViTDet/FPN's 8, patch 16: 32, 64, 128, 256, 512).

    A smaller ``scale`` suits objects small against the image (the built-in 32-px scenes: 4, i.e. 8 .. 128 px)."""
    if scale <= 0:
        raise ValueError(f"anchor scale={scale}: expected a positive multiple of the level stride")
    return tuple((max(1, round(scale * patch_size / 4 * 2**k)),) for k in range(5))


class Detector(nn.Module):
    """A torchvision detector on :class:`DenseBackbone`, with optional soft-NMS at inference.

    ``forward(images, targets)`` is torchvision's: in training a dict of losses, in eval a list of
    ``{"boxes" (N, 4) xyxy, "labels" (N,), "scores" (N,), "masks" (N, 1, H, W) probabilities}``; labels are
    1..num_classes (0 is the background).
    """

    def __init__(self, beit3: MultiwayTransformer, detector: FasterRCNN, soft_nms: bool, detections_per_img: int,
                 soft_nms_sigma: float = 0.5):
        super().__init__()
        self.beit3 = beit3  # official key layout (beit3.*): checkpoints load as into any task model
        self.config = beit3.config  # depth, for layer-wise lr decay
        self.detector = detector
        self.soft_nms, self.soft_nms_sigma, self.detections_per_img = soft_nms, soft_nms_sigma, detections_per_img

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        out = self.detector(images, targets)
        if self.training or not self.soft_nms:
            return out
        for det in out:
            keep, scores = soft_nms(det["boxes"], det["scores"], det["labels"], sigma=self.soft_nms_sigma)
            keep, scores = keep[: self.detections_per_img], scores[: self.detections_per_img]
            for key in list(det):
                det[key] = det[key][keep]
            det["scores"] = scores
        return out


def build_detector(beit3: MultiwayTransformer, num_classes: int, masks: bool = True, pyramid: Literal["vitdet", "beit"] = "vitdet",
                   out_channels: int = 256, min_size: int = 1024, max_size: int = 1024,
                   image_mean: tuple[float, ...] = VL_MEAN, image_std: tuple[float, ...] = VL_STD,
                   soft_nms: bool = False, detections_per_img: int = 100, box_head_width: int = 1024, mask_head_width: int = 256,
                   anchor_scale: float = 8.0, **detector_kwargs: Any) -> Detector:
    """Mask R-CNN (``masks=True``) or Faster R-CNN from torchvision on the multiway backbone plus a pyramid.

    Args:
        beit3: the vision encoder (window attention from its config).
        num_classes: object classes without the background (torchvision gets ``num_classes + 1``).
        pyramid / out_channels: see :class:`DenseBackbone`.
        min_size / max_size: torchvision's resize (short side to ``min_size``, long side at most ``max_size``);
            1024 / 1024 for the ViTDet/BEiT 1024-px recipe on square large-scale-jitter crops.
        image_mean / image_std: the normalisation the backbone was pretrained with (BEiT-3: 0.5 / 0.5).
        soft_nms: rescore with :func:`soft_nms` instead of hard NMS at inference (torchvision's NMS is then
            disabled and 3x ``detections_per_img`` candidates go into soft-NMS).
        box_head_width / mask_head_width: widths of the box head's two FC layers and the mask head's four convs
            (torchvision's defaults 1024 / 256; smaller for tiny CPU models).
        anchor_scale: anchor size as a multiple of each level's stride (:func:`anchor_sizes`).
        detector_kwargs: further torchvision arguments (``rpn_*``, ``box_*``).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: a detector needs at least one object class")
    backbone = DenseBackbone(beit3, pyramid, out_channels, own_backbone=False)
    anchors = AnchorGenerator(anchor_sizes(beit3.config.patch_size, anchor_scale), ((0.5, 1.0, 2.0),) * 5)
    box_pool = MultiScaleRoIAlign(list(LEVELS), output_size=7, sampling_ratio=2)
    kwargs = dict(min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
                  rpn_anchor_generator=anchors, box_roi_pool=box_pool, size_divisible=backbone.stride,
                  box_detections_per_img=3 * detections_per_img if soft_nms else detections_per_img, **detector_kwargs)
    if soft_nms:
        kwargs["box_nms_thresh"] = 1.0  # IoU never exceeds 1: hard NMS keeps everything, soft-NMS rescores
    kwargs["box_head"] = TwoMLPHead(backbone.out_channels * 7 * 7, box_head_width)
    kwargs["box_predictor"] = FastRCNNPredictor(box_head_width, num_classes + 1)
    if masks:
        detector = MaskRCNN(backbone, None, mask_roi_pool=MultiScaleRoIAlign(list(LEVELS), 14, 2),
                            mask_head=MaskRCNNHeads(backbone.out_channels, (mask_head_width,) * 4, 1),
                            mask_predictor=MaskRCNNPredictor(mask_head_width, mask_head_width, num_classes + 1), **kwargs)
    else:
        detector = FasterRCNN(backbone, None, **kwargs)
    return Detector(beit3, detector, soft_nms, detections_per_img)


def large_scale_jitter(size: int, scale_range: tuple[float, float] = (0.1, 2.0), hflip: bool = True):
    """The ViTDet/BEiT training augmentation on torchvision ``tv_tensors``: flip, resize by a random factor of
    ``scale_range`` x ``size``, crop (or pad) to ``size`` x ``size``, drop boxes left empty.

    Call it on ``(image, target)`` with ``image`` a ``tv_tensors.Image`` and ``target`` holding
    ``tv_tensors.BoundingBoxes`` ``boxes``, ``tv_tensors.Mask`` ``masks`` and ``labels``.
    """
    from torchvision.transforms import v2

    steps = [v2.RandomHorizontalFlip()] if hflip else []
    steps += [v2.ScaleJitter((size, size), scale_range=scale_range, antialias=True), v2.RandomCrop(size, pad_if_needed=True),
              v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(steps)


__all__ = ["Detector", "anchor_sizes", "build_detector", "large_scale_jitter", "soft_nms"]
