"""Masking for masked data modeling: block-wise image masks and text masks.

All functions take their randomness from a generator passed in (``random.Random`` for the image masks, as
the official BEiT code draws from Python's ``random``; ``numpy.random.Generator`` for text), so a seeded
generator gives the same masks everywhere, in any dataloader worker.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # label of unmasked positions, for cross_entropy(ignore_index=-100)


class BlockMaskingGenerator:
    """Block-wise image masking of BEiT (§6.2).

    Rectangular blocks of at least ``min_num_patches`` patches with aspect ratio in [min_aspect, 1/min_aspect]
    are added until ``num_masking_patches`` are masked or a block cannot be placed. With ``exact=True`` (the
    BEiT v2 variant) the result is then corrected to exactly ``num_masking_patches`` ones by masking or
    unmasking random cells; with ``exact=False`` (BEiT v1) it can fall short.

    BEiT-3 masks 40% of the patches: ``num_masking_patches=round(0.4 * 196) = 78`` on a 14x14 grid.

    Args:
        input_size: grid side, or (height, width) in patches.
        num_masking_patches: target number of masked patches.
    """

    def __init__(self, input_size: int | tuple[int, int], num_masking_patches: int, min_num_patches: int = 16,
                 max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None,
                 exact: bool = True) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if not 0 <= num_masking_patches <= self.height * self.width:
            raise ValueError(f"num_masking_patches={num_masking_patches} outside [0, {self.height * self.width}]")
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.exact = exact

    @classmethod
    def from_ratio(cls, input_size: int | tuple[int, int], ratio: float = 0.4, **kwargs) -> BlockMaskingGenerator:
        if not 0 <= ratio <= 1:  # also refuses NaN
            raise ValueError(f"masking ratio must be in [0, 1], got {ratio}")
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        return cls((h, w), int(round(ratio * h * w)), **kwargs)

    def _mask(self, mask: np.ndarray, max_mask_patches: int, rng: random.Random) -> int:
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:  # strict: a block never spans the whole side
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = 1
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, rng: random.Random, flat: bool = False) -> torch.Tensor:
        """Returns a bool mask (height, width), or (height*width,) with ``flat``; True = masked."""
        mask = np.zeros((self.height, self.width), dtype=np.int64)
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        if self.exact and count != self.num_masking_patches:
            if count > self.num_masking_patches:
                cells = np.flatnonzero(mask)
                mask.flat[rng.sample(list(cells), count - self.num_masking_patches)] = 0
            else:
                cells = np.flatnonzero(mask == 0)
                mask.flat[rng.sample(list(cells), self.num_masking_patches - count)] = 1
        out = torch.from_numpy(mask.astype(bool))
        return out.flatten() if flat else out

    def __repr__(self) -> str:
        return (f"BlockMaskingGenerator({self.height}x{self.width}, masked={self.num_masking_patches}, "
                f"min_block={self.min_num_patches}, exact={self.exact})")


def _replace(token: int, u: float, probs: Sequence[float], mask_id: int, random_id: int) -> int:
    if u < probs[0]:
        return mask_id
    if u < probs[0] + probs[1]:
        return random_id
    return token


def mask_text(
    ids: torch.Tensor,
    padding_mask: torch.Tensor,
    ratio: float,
    special_ids: Sequence[int],
    mask_id: int,
    vocab_size: int,
    rng: np.random.Generator,
    replace_probs: Sequence[float] = (1.0, 0.0, 0.0),
    random_low: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask text for masked data modeling (BEiT-3: ratio 0.15 for text alone, 0.5 for the text of pairs).

    ``round(ratio * n)`` of the n maskable positions of each row are chosen (never a special id, never
    padding), at least one when a row has any maskable position. A chosen position becomes ``<mask>``, a
    random id in ``[random_low, vocab_size)``, or stays unchanged with ``replace_probs`` = (mask, random,
    keep): ``(1, 0, 0)`` replaces all with ``<mask>``, ``(0.8, 0.1, 0.1)`` is BERT's split. Pass
    ``vocab_size=tokenizer.mask_id`` so a random replacement is never ``<mask>``.

    Args:
        ids: (T,) or (B, T) long token ids.
        padding_mask: same shape, 1 = pad.
    Returns:
        masked ids (same shape), bool mask of the chosen positions, labels (the original ids there,
        ``IGNORE_INDEX`` elsewhere).
    """
    if len(replace_probs) != 3 or abs(sum(replace_probs) - 1.0) > 1e-6 or min(replace_probs) < 0:
        raise ValueError(f"replace_probs must be 3 probabilities summing to 1, got {replace_probs}")
    if not 0 <= ratio <= 1:
        raise ValueError(f"mask_text: ratio must be in [0, 1], got {ratio}")
    if vocab_size <= random_low:
        raise ValueError(f"mask_text: vocab_size={vocab_size} leaves no ids for random replacement in "
                         f"[random_low={random_low}, vocab_size)")
    if ids.shape != padding_mask.shape or ids.dim() not in (1, 2):
        raise ValueError(f"mask_text: ids {tuple(ids.shape)} and padding_mask {tuple(padding_mask.shape)} must share "
                         "a (T,) or (B, T) shape")
    squeeze = ids.dim() == 1
    ids2, pad2 = (ids[None], padding_mask[None]) if squeeze else (ids, padding_mask)
    maskable = (pad2 == 0) & ~torch.isin(ids2, torch.tensor(list(special_ids), dtype=ids2.dtype))
    out = ids2.clone()
    chosen = torch.zeros_like(ids2, dtype=torch.bool)
    for b in range(ids2.shape[0]):
        cand = torch.nonzero(maskable[b]).flatten().numpy()
        if len(cand) == 0:
            continue
        k = min(len(cand), max(1, int(round(ratio * len(cand)))))
        pos = rng.choice(cand, size=k, replace=False)
        chosen[b, torch.from_numpy(pos)] = True
        u = rng.random(k)
        rand_ids = rng.integers(random_low, vocab_size, size=k)
        for p, ui, r in zip(pos.tolist(), u.tolist(), rand_ids.tolist()):
            out[b, p] = _replace(int(ids2[b, p]), ui, replace_probs, mask_id, r)
    labels = torch.where(chosen, ids2, torch.full_like(ids2, IGNORE_INDEX))
    if squeeze:
        return out[0], chosen[0], labels[0]
    return out, chosen, labels


def mask_captioning(
    tokens: Sequence[int],
    num_tokens: int,
    mask_prob: float,
    mask_id: int,
    vocab_size: int,
    rng: random.Random,
) -> tuple[list[int], list[int]]:
    """The official captioning (UniLM-style) masking of §2.5, for ``[<s>] ids [</s>] <pad>...`` of length T.

    Picks ``max(1, min(int(num_tokens*mask_prob + 0.5), num_tokens - 1))`` distinct positions uniformly from
    ``[1, num_tokens-1]`` (``<s>`` never, ``</s>`` possibly); each becomes ``<mask>`` (80%), stays (10%) or a
    random id in ``[3, vocab_size-1]`` (10%), with ``vocab_size`` = the tokenizer's (``len(spm)+2``).
    Returns (masked tokens, language_masked_pos as a 0/1 list of length T).
    """
    tokens = list(tokens)
    masked_pos = [0] * len(tokens)
    if num_tokens < 2:
        raise ValueError(f"captioning masking needs at least 2 tokens (<s> and </s>), got {num_tokens}")
    if num_tokens > len(tokens):
        raise ValueError(f"mask_captioning: num_tokens={num_tokens} exceeds the {len(tokens)} tokens given")
    if vocab_size < 4:
        raise ValueError(f"mask_captioning: vocab_size={vocab_size} leaves no ids for random replacement in [3, vocab_size - 1]")
    to_mask = max(1, min(int(num_tokens * mask_prob + 0.5), num_tokens - 1))
    done = 0
    while done < to_mask:
        i = rng.randint(1, num_tokens - 1)
        if masked_pos[i]:
            continue
        masked_pos[i] = 1
        p = rng.random()
        if p < 0.8:
            tokens[i] = mask_id
        elif p >= 0.9:
            tokens[i] = rng.randint(3, vocab_size - 1)
        done += 1
    return tokens, masked_pos
