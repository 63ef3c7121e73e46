"""The dense task models as the model registry builds them: ``(config, **head arguments)``, ``head_config()``.

Registered in :data:`multiway.model.heads.TASK_HEADS` under ``detection``, ``semanticsegmentation`` and
``tokenclassification``, so ``create_model("beit3_base_patch16_224_detection", num_classes=80)`` builds one,
:func:`multiway.save_pretrained` embeds the head arguments and ``create_model(file)`` rebuilds it. The backbone is
``model.beit3`` (official key layout), so pretraining and official checkpoints load into it unchanged.
"""

from __future__ import annotations

from typing import Any

from ..model.config import MultiwayConfig
from ..model.multiway import MultiwayTransformer
from .detection import Detector, build_detector
from .segmentation import UperNetSegmenter
from .sequence_labelling import TokenClassifier


class BEiT3ForDetection(Detector):
    """Mask R-CNN (``masks=True``) or Faster R-CNN on the vision encoder (see :func:`~multiway.dense.detection.build_detector`).

    ``forward(images: list of (3, H, W) in [0, 1], targets=None)``: torchvision's (losses in training, detections
    in eval). Head arguments: ``num_classes`` (without the background), ``masks``, ``pyramid``, ``out_channels``,
    ``min_size`` / ``max_size``, ``soft_nms``, ``detections_per_img``, head widths, RPN/RoI sampling sizes and
    ``anchor_scale``.
    """

    def __init__(self, config: MultiwayConfig, num_classes: int = 80, masks: bool = True, pyramid: str = "vitdet",
                 out_channels: int = 256, min_size: int = 1024, max_size: int = 1024, soft_nms: bool = False,
                 detections_per_img: int = 100, box_head_width: int = 1024, mask_head_width: int = 256,
                 rpn_pre_nms_top_n_train: int = 2000, rpn_post_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                 rpn_post_nms_top_n_test: int = 1000, box_batch_size_per_image: int = 512, anchor_scale: float = 8.0):
        self._head_config = {k: v for k, v in locals().items() if k not in ("self", "config", "__class__")}
        built = build_detector(MultiwayTransformer(config), **self._head_config)
        super().__init__(built.beit3, built.detector, soft_nms, detections_per_img)

    @property
    def num_classes(self) -> int:
        return self._head_config["num_classes"]

    def head_config(self) -> dict[str, Any]:
        return dict(self._head_config)


class BEiT3ForSemanticSegmentation(UperNetSegmenter):
    """UperNet over the BEiT pyramid; ``forward(image, labels=None)`` -> (logits (B, K, H, W), loss or None)."""

    def __init__(self, config: MultiwayConfig, num_classes: int = 150, channels: int = 768, aux_channels: int = 256,
                 aux_weight: float = 0.4, taps: list[int] | None = None, input_scale: float = 1.0):
        super().__init__(MultiwayTransformer(config), num_classes, channels, aux_channels, aux_weight,
                         tuple(taps) if taps is not None else None, input_scale)
        self._head_config = {"num_classes": num_classes, "channels": channels, "aux_channels": aux_channels,
                             "aux_weight": aux_weight, "taps": list(self.backbone.taps), "input_scale": input_scale}

    def head_config(self) -> dict[str, Any]:
        return dict(self._head_config)


class BEiT3ForTokenClassification(TokenClassifier):
    """Per-token tags through the language encoder; ``forward(language_tokens, padding_mask, labels=None)``."""

    def __init__(self, config: MultiwayConfig, num_classes: int = 9, dropout: float = 0.1):
        super().__init__(MultiwayTransformer(config), num_classes, dropout)
        self._head_config = {"num_classes": num_classes, "dropout": dropout}

    @property
    def num_classes(self) -> int:
        return self.num_labels

    def head_config(self) -> dict[str, Any]:
        return dict(self._head_config)


# task suffix -> (class, config overrides), merged into TASK_HEADS
DENSE_HEADS: dict[str, tuple[type, dict]] = {
    "detection": (BEiT3ForDetection, {}),
    "semanticsegmentation": (BEiT3ForSemanticSegmentation, {}),
    "tokenclassification": (BEiT3ForTokenClassification, {}),
}

__all__ = ["DENSE_HEADS", "BEiT3ForDetection", "BEiT3ForSemanticSegmentation", "BEiT3ForTokenClassification"]
