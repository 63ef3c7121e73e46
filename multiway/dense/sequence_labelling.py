"""Sequence labelling (NER, chunking) through the language encoder: a per-token linear classifier."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..model.multiway import MultiwayTransformer
from .data import IGNORE_LABEL


class TokenClassifier(nn.Module):
    """Language encoder -> dropout -> Linear(D, K) on every token.

    ``forward(language_tokens (B, T), padding_mask (B, T), labels (B, T) or None)`` -> (logits (B, T, K), loss or None);
    the loss is the cross-entropy over tokens whose label is not ``IGNORE_LABEL`` (-100: specials, padding and the
    non-first subwords of a word; see :func:`multiway.dense.data.align_labels`).
    """

    def __init__(self, beit3: MultiwayTransformer, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels={num_labels}: expected at least one tag")
        self.beit3, self.config, self.num_labels = beit3, beit3.config, num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(beit3.config.embed_dim, num_labels)

    def forward(self, language_tokens: Tensor, padding_mask: Tensor | None = None, labels: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        hidden = self.beit3.encode_text(language_tokens, padding_mask)
        logits = self.classifier(self.dropout(hidden))
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_LABEL)


__all__ = ["TokenClassifier"]
