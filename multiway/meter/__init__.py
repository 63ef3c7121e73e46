"""METER (Dou et al. 2022): end-to-end vision-language transformers from timm/transformers encoders, with
co-attention or merged-attention fusion, encoder-only or encoder-decoder, and switchable objectives.

>>> from multiway.meter import METERForVQA, get_meter_config
>>> model = METERForVQA(get_meter_config("meter_tiny_vit_bert_coattn"), num_labels=10)
"""

from .config import (
    PRESETS,
    DecoderConfig,
    FusionConfig,
    MeterConfig,
    ObjectiveConfig,
    OptimConfig,
    TextEncoderConfig,
    VisionEncoderConfig,
    get_meter_config,
    tiny_config,
)
from .fusion import CoAttentionFusion, MergedAttentionFusion
from .model import (
    METERForCaptioning,
    METERForNLVR2,
    METERForPretraining,
    METERForRetrieval,
    METERForVQA,
    METERModel,
    MeterOutput,
)
from .objectives import TextSpec, pretraining_loss
from .optim import meter_param_groups, train_config

__all__ = [
    "PRESETS",
    "CoAttentionFusion",
    "DecoderConfig",
    "FusionConfig",
    "METERForCaptioning",
    "METERForNLVR2",
    "METERForPretraining",
    "METERForRetrieval",
    "METERForVQA",
    "METERModel",
    "MergedAttentionFusion",
    "MeterConfig",
    "MeterOutput",
    "ObjectiveConfig",
    "OptimConfig",
    "TextEncoderConfig",
    "TextSpec",
    "VisionEncoderConfig",
    "get_meter_config",
    "train_config",
    "meter_param_groups",
    "pretraining_loss",
    "tiny_config",
]
