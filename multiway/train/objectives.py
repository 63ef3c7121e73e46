"""Masked data modeling (BEiT-3 §2.2): one loss over text-only, image-only and image-text streams.

A pretraining batch is a dict of streams; each stream is a dict of tensors (any may be absent)::

    batch = {
        "text":  {"text_ids" (B,T) masked input ids, "padding_mask" (B,T) 1=pad,
                  "text_masked_positions" (B,T) bool, "text_targets" (M_t,) original ids at the masked positions},
        "image": {"image" (B,3,H,W), "image_masked_positions" (B,N) bool, "image_targets" (M_i,) visual tokens},
        "pair":  {all of the above; image masking optional (no "image_masked_positions" = image left intact)},
    }

Targets are listed in row-major order of the masked positions (``ids[mask]``), the order in which
:class:`multiway.BEiT3ForPretraining` returns logits. Each stream's loss is the cross-entropy averaged over its
masked tokens; the total is the sum over streams (text, image, pair-text, pair-image), each weighted by
``weights`` (default 1). Logged: ``<stream>/loss`` and ``<stream>/acc`` (masked-token accuracy) for
``text``, ``image``, ``pair_text`` and ``pair_image``.

:func:`pair_contrastive_loss` adds an image-text contrastive (ITC) loss on the pairs of the same batch: each pair's
image alone and its full text alone through the dual-encoder heads of a ``contrastive=True`` model, CLIP loss over
all ranks (logged as ``itc/loss`` and ``itc/acc``, the in-batch image-to-text top-1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STREAMS = ("text", "image", "pair")


def masked_ce(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy over masked tokens. logits: (M, V), targets: (M,). Returns (loss, acc), fp32.

    With M = 0 the loss is a zero that still depends on ``logits`` (keeps DDP's gradient graph connected).
    """
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits for {targets.shape[0]} targets: masked positions and targets disagree")
    logits = logits.float()
    if targets.numel() == 0:
        return logits.sum() * 0.0, torch.zeros((), device=logits.device)
    loss = F.cross_entropy(logits, targets)
    acc = (logits.detach().argmax(-1) == targets).float().mean()
    return loss, acc


def stream_loss(model: nn.Module, name: str, s: dict) -> dict[str, tuple[Tensor, Tensor]]:
    """Forward one stream through a :class:`~multiway.BEiT3ForPretraining`; returns ``{part: (loss, acc)}``."""
    text_mask = s.get("text_masked_positions")
    image_mask = s.get("image_masked_positions")
    text_logits, image_logits = model(
        image=s.get("image"),
        text_ids=s.get("text_ids"),
        padding_mask=s.get("padding_mask"),
        image_masked_positions=image_mask,
        text_masked_positions=text_mask,
    )
    out = {}
    prefix = "" if name != "pair" else "pair_"
    if text_logits is not None:
        out[f"{prefix}text" if prefix else "text"] = masked_ce(text_logits, s["text_targets"])
    if image_logits is not None:
        out[f"{prefix}image" if prefix else "image"] = masked_ce(image_logits, s["image_targets"])
    return out


def mdm_loss(model: nn.Module, batch: dict, weights: dict[str, float] | None = None) -> tuple[Tensor, dict[str, float]]:
    """The masked-data-modeling loss of a mixed batch (see the module docstring). Returns (loss, logs)."""
    weights = weights or {}
    total: Tensor | None = None
    logs: dict[str, float] = {}
    for name in STREAMS:
        s = batch.get(name)
        if not s:
            continue
        for part, (loss, acc) in stream_loss(model, name, s).items():
            w = weights.get(part, 1.0)
            total = loss * w if total is None else total + loss * w
            logs[f"{part}/loss"] = loss.detach().item()
            logs[f"{part}/acc"] = acc.item()
    if total is None:
        raise ValueError(f"pretraining batch has no stream: expected some of {STREAMS}, got keys {sorted(batch)}")
    return total, logs


def unmasked_text(s: dict) -> Tensor:
    """The original text ids of a stream dict: ``text_ids`` with the masked positions set back to ``text_targets``."""
    ids = s["text_ids"].clone()
    mask = s.get("text_masked_positions")
    if mask is not None:
        ids[mask.bool()] = s["text_targets"]
    return ids


def pair_contrastive_loss(model: nn.Module, s: dict) -> tuple[Tensor, Tensor, Tensor]:
    """ITC on a pair stream: (CLIP loss over all ranks in fp32, image->text hits (B,), text->image hits (B,)).

    A hit: the row's own caption (image) is its top-1 among the batch's pairs. Uses the unmasked image and the
    original text (masked words restored), each encoded alone by a ``contrastive=True``
    :class:`~multiway.BEiT3ForPretraining`."""
    loss, image_feats, text_feats = model(image=s["image"], text_ids=unmasked_text(s), padding_mask=s.get("padding_mask"), contrastive=True)
    sim = image_feats.detach().float() @ text_feats.detach().float().t()
    target = torch.arange(sim.shape[0], device=sim.device)
    return loss, sim.argmax(1) == target, sim.argmax(0) == target


def other_image_order(images: Tensor) -> Tensor:
    """(B,) index of another image for each row: the first row after it (cyclically) whose image differs, or the
    row itself when every image of the batch is the same. Captions come several per image, so a plain roll by
    one would mostly pair a caption with its own picture again."""
    ids = torch.unique(images.flatten(1), dim=0, return_inverse=True)[1]
    rows = torch.arange(ids.shape[0], device=ids.device)
    if ids.shape[0] < 2:
        return rows
    candidates = (rows[:, None] + rows[None, 1:]) % ids.shape[0]  # (B, B-1): the following rows, nearest first
    differs = ids[candidates] != ids[:, None]
    other = candidates.gather(1, differs.float().argmax(1, keepdim=True)).squeeze(1)  # the first that differs
    return torch.where(differs.any(1), other, rows)


@torch.no_grad()
def masked_accuracy_counts(model: nn.Module, batch: dict) -> dict[str, tuple[int, int]]:
    """``{part: (correct, total)}`` over the masked tokens of a batch (for held-out evaluation).

    For the pair stream also ``pair_text_shuffled``: the masked text of each pair predicted beside another pair's
    image (:func:`other_image_order`; with that pair's image mask when pair images are masked too). Its gap to
    ``pair_text`` is what the model reads from the image; a model that learned only the language of captions
    scores the same on both."""
    out: dict[str, tuple[int, int]] = {}
    for name in STREAMS:
        s = batch.get(name)
        if not s:
            continue
        text_logits, image_logits = model(
            image=s.get("image"),
            text_ids=s.get("text_ids"),
            padding_mask=s.get("padding_mask"),
            image_masked_positions=s.get("image_masked_positions"),
            text_masked_positions=s.get("text_masked_positions"),
        )
        prefix = "pair_" if name == "pair" else ""
        for part, logits, key in ((f"{prefix}text", text_logits, "text_targets"), (f"{prefix}image", image_logits, "image_targets")):
            if logits is None:
                continue
            t = s[key]
            out[part] = (int((logits.argmax(-1) == t).sum()), int(t.numel()))
        if name == "pair" and s.get("image") is not None and s["image"].shape[0] > 1 and s.get("text_masked_positions") is not None:
            image_mask, order = s.get("image_masked_positions"), other_image_order(s["image"])
            text_logits, _ = model(image=s["image"][order], text_ids=s["text_ids"], padding_mask=s.get("padding_mask"),
                                   image_masked_positions=None if image_mask is None else image_mask[order],
                                   text_masked_positions=s["text_masked_positions"])
            t = s["text_targets"]
            out["pair_text_shuffled"] = (int((text_logits.argmax(-1) == t).sum()), int(t.numel()))
    return out


__all__ = ["STREAMS", "masked_accuracy_counts", "masked_ce", "mdm_loss", "other_image_order", "pair_contrastive_loss", "stream_loss",
           "unmasked_text"]
