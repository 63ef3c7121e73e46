"""METER's retrieval protocol: the fusion encoder scores every image x text pair (``compute_irtr_recall``).

METER ranks by ``rank_output(cls_feats)`` of the fused pair alone, over the full image x text matrix. Here the
unimodal encoders run once per image and once per text (their outputs do not depend on the partner), and the
fusion runs on chunks of ``image_chunk x text_chunk`` pairs, so memory stays bounded at any gallery size. The
recall is computed from the score matrix as METER does (``R@K`` in both directions; an image's texts are all
captions that share its ``image_id``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..downstream.metrics import retrieval_recall
from .model import METERForRetrieval


def _in_batches(fn, x: Tensor, *rest: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(x[s : s + batch_size], *(r[s : s + batch_size] for r in rest)) for s in range(0, len(x), batch_size)])


@torch.no_grad()
def rescore_all(
    model: METERForRetrieval, images: Tensor, text_ids: Tensor, padding_mask: Tensor | None = None,
    image_chunk: int = 8, text_chunk: int = 64, encode_batch: int = 64,
) -> Tensor:
    """Fusion score of every pair: images (I, 3, H, W), text_ids (T, L), padding_mask (T, L) nonzero = pad.

    Returns scores (I, T) float32. ``image_chunk x text_chunk`` pairs are fused per forward pass; each image and
    each text is encoded once (in batches of ``encode_batch``).
    """
    for name, value in (("image_chunk", image_chunk), ("text_chunk", text_chunk), ("encode_batch", encode_batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    m = model.meter
    dev = next(model.parameters()).device
    pad = torch.zeros_like(text_ids) if padding_mask is None else padding_mask
    t_tok = _in_batches(m.encode_text_tokens, text_ids.to(dev), pad.to(dev), batch_size=encode_batch)
    v_tok = _in_batches(m.encode_image_tokens, images.to(dev), batch_size=encode_batch)
    pad = pad.to(dev)
    n_img, n_txt = v_tok.shape[0], t_tok.shape[0]
    scores = torch.empty(n_img, n_txt, dtype=torch.float32, device=dev)
    for i0 in range(0, n_img, image_chunk):
        v = v_tok[i0 : i0 + image_chunk]
        for t0 in range(0, n_txt, text_chunk):
            t, p = t_tok[t0 : t0 + text_chunk], pad[t0 : t0 + text_chunk]
            ci, ct = v.shape[0], t.shape[0]
            # pair (a, b) = image a with text b, image-major
            s = model.score(t.repeat(ci, 1, 1), v.repeat_interleave(ct, dim=0), p.repeat(ci, 1))
            scores[i0 : i0 + ci, t0 : t0 + ct] = s.float().view(ci, ct)
    return scores


def recall_from_scores(scores: Tensor, image_ids: Tensor, text_image_ids: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """IR/TR R@K (percent) from an (I, T) score matrix; ``image_ids`` (I,) unique, ``text_image_ids`` (T,)."""
    if scores.shape != (len(image_ids), len(text_image_ids)):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(image_ids)} images x {len(text_image_ids)} texts")
    if len(set(image_ids.tolist())) != len(image_ids):
        raise ValueError("image_ids must be unique: one row of scores per image")
    eye = torch.eye(scores.shape[1], device=scores.device)  # retrieval_recall scores image_feats @ text_feats.T
    return retrieval_recall(scores, image_ids.to(scores.device), eye, text_image_ids.to(scores.device), ks)


def compute_irtr_recall(
    model: METERForRetrieval, images: Tensor, image_ids: Tensor, text_ids: Tensor, padding_mask: Tensor | None,
    text_image_ids: Tensor, **chunks: int,
) -> dict[str, float]:
    """METER's evaluation: :func:`rescore_all` then :func:`recall_from_scores` (``ir_r@k``, ``tr_r@k``, ``average``)."""
    return recall_from_scores(rescore_all(model, images, text_ids, padding_mask, **chunks), image_ids, text_image_ids)
