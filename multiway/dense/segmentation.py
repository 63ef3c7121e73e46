"""Semantic segmentation: a UperNet head over the BEiT pyramid, sliding-window inference, ADE20K's label convention.

The head is ``transformers``' ``UperNetHead`` (pyramid pooling over scales 1, 2, 3, 6 on the deepest map, an FPN
over all four, fused 3x3 conv, 1x1 classifier) and its auxiliary ``UperNetFCNHead`` on the third map: a port of
mmsegmentation's UPerHead/FCNHead, the heads BEiT's and BEiT-3's ADE20K recipes use, and it takes a list of
(B, C_i, H_i, W_i) maps as the pyramid gives them. (segmentation_models_pytorch's UPerNet decoder also fits the
maps but is a further dependency with no auxiliary head.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.multiway import MultiwayTransformer
from .pyramid import DenseBackbone

IGNORE_INDEX = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's ``reduce_zero_label``: 0 ("other") becomes the ignore index 255 and class k becomes k - 1."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


class UperNetSegmenter(nn.Module):
    """Vision encoder -> BEiT pyramid (four tapped blocks) -> UperNet (+ auxiliary FCN head).

    ``forward(image, labels=None)``: image (B, 3, H, W) -> logits (B, K, H, W) (upsampled bilinearly); with labels
    (B, H, W) long (``IGNORE_INDEX`` ignored) also the loss ``CE(main) + aux_weight * CE(aux)`` (the recipe: 0.4).

    Args:
        beit3: the vision encoder.
        num_classes: K.
        channels: UperNet width (the recipe: 768 for base and large).
        aux_channels: the auxiliary FCN head's width (the recipe: 256).
        aux_weight: weight of the auxiliary loss.
        taps: the tapped blocks (default :func:`~multiway.dense.pyramid.default_taps`).
        input_scale: the image is resized bilinearly by this factor before the encoder and the logits come back at
            the image's size (a rounded multiple of the patch size); > 1 gives small objects more patches (the
            built-in 32-px scenes: 2).
    """

    def __init__(self, beit3: MultiwayTransformer, num_classes: int, channels: int = 768, aux_channels: int = 256,
                 aux_weight: float = 0.4, taps: tuple[int, ...] | None = None, input_scale: float = 1.0):
        super().__init__()
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: expected at least one class")
        if input_scale <= 0:
            raise ValueError(f"input_scale={input_scale}: expected a positive resize factor")
        self.input_scale = input_scale
        self.beit3 = beit3  # official key layout (beit3.*)
        self.config = beit3.config  # depth, for layer-wise lr decay
        self.backbone = DenseBackbone(beit3, "beit", out_channels=0, taps=taps, own_backbone=False)
        head_config = UperNetConfig(num_labels=num_classes, hidden_size=channels, pool_scales=(1, 2, 3, 6),
                                    auxiliary_channels=aux_channels, auxiliary_num_convs=1, auxiliary_concat_input=False)
        widths = [self.backbone.out_channels] * 4
        self.decode_head = UperNetHead(head_config, in_channels=widths)
        self.auxiliary_head = UperNetFCNHead(head_config, in_channels=widths, in_index=2)
        self.num_classes, self.aux_weight = num_classes, aux_weight

    def forward(self, image: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        size = image.shape[-2:]
        if self.input_scale != 1.0:
            patch = self.config.patch_size
            scaled = [max(patch, round(side * self.input_scale / patch) * patch) for side in size]
            image = F.interpolate(image, size=scaled, mode="bilinear", align_corners=False)
        maps = list(self.backbone(image).values())
        logits = F.interpolate(self.decode_head(maps), size=size, mode="bilinear", align_corners=False)
        if labels is None:
            return logits, None
        aux = F.interpolate(self.auxiliary_head(maps), size=size, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        loss = loss + self.aux_weight * F.cross_entropy(aux, labels, ignore_index=IGNORE_INDEX)
        return logits, loss


@torch.no_grad()
def slide_inference(model: nn.Module, image: Tensor, num_classes: int, crop: int, stride: int, max_windows: int = 16) -> Tensor:
    """Class scores of a large image from overlapping ``crop`` x ``crop`` windows ``stride`` apart (mmseg's "slide").

    The last window in each direction is moved back to end at the border; the softmax scores of overlapping windows
    are averaged. An image smaller than the crop is padded (bottom/right) and the padding cropped from the result.
    image (B, 3, H, W) -> scores (B, K, H, W). ``model(crops)`` returns ``(logits, _)`` for crops (b, 3, crop, crop);
    up to ``max_windows`` windows (of every image) go through one forward.
    """
    if stride <= 0 or crop <= 0:
        raise ValueError(f"crop={crop} and stride={stride} must be positive")
    batch, _, height, width = image.shape
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
    padded = F.pad(image, (0, pad_w, 0, pad_h))
    full_h, full_w = padded.shape[-2:]
    scores = image.new_zeros(batch, num_classes, full_h, full_w)
    counts = image.new_zeros(1, 1, full_h, full_w)
    rows = max(math.ceil((full_h - crop) / stride), 0) + 1
    cols = max(math.ceil((full_w - crop) / stride), 0) + 1
    corners = [(min(r * stride, full_h - crop), min(c * stride, full_w - crop)) for r in range(rows) for c in range(cols)]
    for start in range(0, len(corners), max_windows):  # several windows per forward
        chunk = corners[start : start + max_windows]
        crops = torch.cat([padded[:, :, top : top + crop, left : left + crop] for top, left in chunk])
        probs = model(crops)[0].float().softmax(1).view(len(chunk), batch, num_classes, crop, crop)
        for (top, left), p in zip(chunk, probs):
            scores[:, :, top : top + crop, left : left + crop] += p
            counts[:, :, top : top + crop, left : left + crop] += 1
    return (scores / counts)[:, :, :height, :width]


__all__ = ["IGNORE_INDEX", "UperNetSegmenter", "reduce_zero_label", "slide_inference"]
