"""Feature pyramids over the vision encoder, and the backbone torchvision's detectors take.

Two recipes turn the single-scale patch maps of :meth:`MultiwayTransformer.forward_intermediates` (stride p, the
patch size) into maps at strides p/4, p/2, p and 2p:

* :class:`SimpleFeaturePyramid` — ViTDet (Li et al. 2022): from the **last** block's map only; deconvolutions for
  scales 4 and 2, identity for 1, max-pool for 0.5, each followed by a 1x1 and a 3x3 conv with LayerNorm, plus
  ``p6`` max-pooled from ``p5`` for the RPN.
* :class:`BEiTFeaturePyramid` — the BEiT / BEiT-3 segmentation recipe: four **tapped** blocks (base 3, 5, 7, 11;
  large 7, 11, 15, 23), deconv x4 (two stride-2 deconvolutions with BatchNorm and GELU), deconv x2, identity and
  max-pool; channels stay D. For detection torchvision's ``FeaturePyramidNetwork`` (with a max-pooled ``p6``)
  brings them to a common width.

Both return ``OrderedDict`` maps keyed ``p2 .. p5`` (``p6``), the stride of ``p<k>`` being ``2^k`` for patch 16.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..model.multiway import MultiwayTransformer

LEVELS = ("p2", "p3", "p4", "p5")

# The BEiT recipe's tapped blocks for the official depths (0-based block indices).
OFFICIAL_TAPS: dict[int, tuple[int, ...]] = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}


def default_taps(depth: int) -> tuple[int, int, int, int]:
    """The four blocks the BEiT recipe taps: the official ones for depth 12/24, else evenly spaced ending at the last."""
    if depth in OFFICIAL_TAPS:
        return OFFICIAL_TAPS[depth]
    return tuple(max(depth * k // 4 - 1, 0) for k in (1, 2, 3, 4))  # type: ignore[return-value]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one (B, D, h, w) map -> p2..p5 (scales 4, 2, 1, 0.5) and p6, all ``out_channels``.

    Args:
        dim: D, the backbone width.
        out_channels: width of every output map (ViTDet: 256).
    """

    def __init__(self, dim: int, out_channels: int = 256):
        super().__init__()
        half, quarter = max(dim // 2, 1), max(dim // 4, 1)
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, half, 2, stride=2), LayerNorm2d(half), nn.GELU(),
                          nn.ConvTranspose2d(half, quarter, 2, stride=2)),
            nn.ConvTranspose2d(dim, half, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, stride=2),
        ])
        self.outputs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for width in (quarter, half, dim, dim)
        )
        self.out_channels = out_channels

    def forward(self, feature: Tensor) -> OrderedDict[str, Tensor]:
        """feature: (B, D, h, w) -> {p2: (B, C, 4h, 4w), p3: 2h, p4: h, p5: h/2, p6: h/4} (C = out_channels)."""
        maps = OrderedDict((name, out(scale(feature))) for name, scale, out in zip(LEVELS, self.scales, self.outputs))
        maps["p6"] = F.max_pool2d(maps["p5"], kernel_size=1, stride=2)
        return maps


class BEiTFeaturePyramid(nn.Module):
    """The BEiT recipe: four (B, D, h, w) maps of tapped blocks -> p2..p5 at scales 4, 2, 1, 0.5, D channels each.

    BatchNorm as in the official recipe (SyncBN across GPUs: ``nn.SyncBatchNorm.convert_sync_batchnorm``).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                          nn.ConvTranspose2d(dim, dim, 2, stride=2)),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, stride=2),
        ])
        self.out_channels = dim

    def forward(self, features: list[Tensor]) -> OrderedDict[str, Tensor]:
        """features: four (B, D, h, w) maps, shallow to deep -> {p2: 4h, p3: 2h, p4: h, p5: h/2}, each (B, D, ., .)."""
        if len(features) != 4:
            raise ValueError(f"BEiTFeaturePyramid takes the maps of 4 tapped blocks, got {len(features)}")
        return OrderedDict((name, scale(x)) for name, scale, x in zip(LEVELS, self.scales, features))


class DenseBackbone(nn.Module):
    """The vision encoder plus a pyramid, as the ``backbone`` of torchvision's detectors (``out_channels`` set).

    Args:
        beit3: the backbone (:class:`MultiwayTransformer`); its ``window_size`` / ``global_attention_interval``
            select ViTDet window attention.
        pyramid: ``"vitdet"`` (:class:`SimpleFeaturePyramid` on the last block) or ``"beit"``
            (:class:`BEiTFeaturePyramid` on ``taps``).
        out_channels: width of the output maps; for ``"beit"`` a torchvision ``FeaturePyramidNetwork`` maps the
            D-channel maps to it and adds p6 (0 keeps D channels and p2..p5 only, as UperNet takes them).
        taps: the BEiT recipe's blocks (default :func:`default_taps`).
        own_backbone: register ``beit3`` as a submodule (``beit3.*`` keys). A task model that already holds it
            as ``model.beit3`` (the official key layout) passes False, so its parameters are listed once.
    """

    def __init__(self, beit3: MultiwayTransformer, pyramid: Literal["vitdet", "beit"] = "vitdet", out_channels: int = 256,
                 taps: tuple[int, ...] | None = None, own_backbone: bool = True):
        super().__init__()
        dim = beit3.config.embed_dim
        if own_backbone:
            self.beit3 = beit3
        else:
            self._shared = (beit3,)  # a tuple hides it from nn.Module registration; the owner moves/saves it
        self.kind = pyramid
        self.config = beit3.config  # depth for layer-wise lr decay
        if pyramid == "vitdet":
            if out_channels <= 0:
                raise ValueError(f"out_channels={out_channels}: the ViTDet pyramid needs a positive width")
            self.taps: tuple[int, ...] = (beit3.num_layers - 1,)
            self.pyramid: nn.Module = SimpleFeaturePyramid(dim, out_channels)
            self.fpn = None
            self.out_channels = out_channels
        elif pyramid == "beit":
            self.taps = tuple(taps) if taps is not None else default_taps(beit3.num_layers)
            if len(self.taps) != 4:
                raise ValueError(f"taps={self.taps}: the BEiT pyramid taps 4 blocks")
            self.pyramid = BEiTFeaturePyramid(dim)
            self.fpn = FeaturePyramidNetwork([dim] * 4, out_channels, extra_blocks=LastLevelMaxPool()) if out_channels > 0 else None
            self.out_channels = out_channels if out_channels > 0 else dim
        else:
            raise ValueError(f"pyramid={pyramid!r}: expected 'vitdet' or 'beit'")

    @property
    def backbone(self) -> MultiwayTransformer:
        return self.beit3 if "beit3" in self._modules else self._shared[0]

    @property
    def stride(self) -> int:
        """Stride of the coarsest level p5 relative to the input: inputs are padded to a multiple of it."""
        return 2 * self.backbone.config.patch_size

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """images: (B, 3, H, W), H and W multiples of the patch size -> maps p2..p5 (p6), strides p/4 .. 2p (4p)."""
        blocks = sorted(set(self.taps))  # shallow models may tap one block twice
        maps = self.backbone.forward_intermediates(images, indices=blocks, stop_early=True, intermediates_only=True)
        if self.kind == "vitdet":
            return self.pyramid(maps[-1])
        pyramid = self.pyramid([maps[blocks.index(t)] for t in self.taps])
        if self.fpn is None:
            return pyramid
        out = self.fpn(pyramid)
        return OrderedDict((name, out[key]) for name, key in zip((*LEVELS, "p6"), out))


__all__ = ["LEVELS", "OFFICIAL_TAPS", "BEiTFeaturePyramid", "DenseBackbone", "SimpleFeaturePyramid", "default_taps"]
