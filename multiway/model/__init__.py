"""Models: the Multiway Transformer backbone, task heads, the model registry and checkpoint I/O."""

from .checkpoints import load_checkpoint, save_pretrained
from .factory import create_model, list_models
from .heads import (
    TASK_HEADS,
    BEiT3ForCaptioning,
    BEiT3ForImageClassification,
    BEiT3ForPretraining,
    BEiT3ForRetrieval,
    BEiT3ForTextClassification,
    BEiT3ForVisualQuestionAnswering,
    BEiT3ForVisualReasoning,
    BEiT3Model,
)
from .multiway import KVCache, MultiwayOutput, MultiwayTransformer, image_to_text_mask

__all__ = [
    "TASK_HEADS",
    "BEiT3ForCaptioning",
    "BEiT3ForImageClassification",
    "BEiT3ForPretraining",
    "BEiT3ForRetrieval",
    "BEiT3ForTextClassification",
    "BEiT3ForVisualQuestionAnswering",
    "BEiT3ForVisualReasoning",
    "BEiT3Model",
    "KVCache",
    "MultiwayOutput",
    "MultiwayTransformer",
    "create_model",
    "image_to_text_mask",
    "list_models",
    "load_checkpoint",
    "save_pretrained",
]
