"""A text-only task head (beyond the official release): sentence classification with the language expert.

``BEiT3ForTextClassification`` runs the backbone as a language encoder (text-only pass, expert ``B``), pools
the ``<s>`` token like the VQA pooler (``tanh(dense(LN(x[:, 0])))``) and classifies with a linear layer. It is
registered as task suffix ``textclassification``, so ``create_model("beit3_base_patch16_224_textclassification",
num_classes=...)``, :func:`multiway.save_pretrained` and ``create_model(path)`` work once this module is imported
(``import multiway.evaluate`` imports it).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import MultiwayConfig
from .heads import TASK_HEADS, BEiT3Model, Pooler, _init_linear_and_norm


class BEiT3ForTextClassification(BEiT3Model):
    """forward(text_ids (B,T), padding_mask (B,T)) -> logits (B, num_classes). Vision weights are unused."""

    def __init__(self, config: MultiwayConfig, num_classes: int = 2):
        super().__init__(config)
        self.num_classes = num_classes
        self.pooler = Pooler(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, num_classes)
        _init_linear_and_norm(self.pooler)
        _init_linear_and_norm(self.head)

    def head_config(self) -> dict:
        return {"num_classes": self.num_classes}

    def forward(self, text_ids: Tensor, padding_mask: Tensor | None = None, **kwargs) -> Tensor:
        x = self.beit3.encode_text(text_ids, padding_mask)
        return self.head(self.pooler(x))


TASK_HEADS.setdefault("textclassification", (BEiT3ForTextClassification, {}))

__all__ = ["BEiT3ForTextClassification"]
