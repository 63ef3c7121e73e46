"""multiway: Multiway Transformers (BEiT-3) and METER in PyTorch.

>>> import multiway
>>> model = multiway.create_model("beit3_base_patch16_480_vqav2")
>>> multiway.load_checkpoint(model, "beit3_base_patch16_480_vqa.pth")
>>> model, processor = multiway.load("vqa.safetensors")      # tokenizer, preprocessing and answers from the file
>>> processor.predict(images=["photo.jpg"], text="what color is it?").rows
"""

from .model import (
    BEiT3ForCaptioning,
    BEiT3ForImageClassification,
    BEiT3ForPretraining,
    BEiT3ForRetrieval,
    BEiT3ForVisualQuestionAnswering,
    BEiT3ForVisualReasoning,
    KVCache,
    MultiwayTransformer,
    create_model,
    list_models,
    load_checkpoint,
    save_pretrained,
)
from .model.config import PRESETS, MultiwayConfig, get_config
from .processing import Processor, load

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BEiT3ForCaptioning",
    "BEiT3ForImageClassification",
    "BEiT3ForPretraining",
    "BEiT3ForRetrieval",
    "BEiT3ForVisualQuestionAnswering",
    "BEiT3ForVisualReasoning",
    "KVCache",
    "MultiwayConfig",
    "MultiwayTransformer",
    "Processor",
    "create_model",
    "get_config",
    "list_models",
    "load",
    "load_checkpoint",
    "save_pretrained",
]
