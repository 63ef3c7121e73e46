"""METER pre-training objectives: MLM (optionally whole-word), T5 span corruption, ITM (optionally with hard
negatives from in-batch similarities), MIM (masked-patch regression or VQ-KD visual-token prediction).

A pre-training batch is ``{"image": (B, 3, H, W), "language_tokens": (B, T), "padding_mask": (B, T)}``.
Masking happens here, inside :func:`pretraining_loss`, drawing from torch's global RNG (which the training
loop seeds and checkpoints), so the data side stays a plain image-text dataset.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.masking import IGNORE_INDEX, BlockMaskingGenerator, mask_text
from .config import ObjectiveConfig
from .model import METERForPretraining, METERModel

# BEiT-3 transforms normalise with mean = std = 0.5 (inception); VQ-KD wants [0, 1] pixels.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5


@dataclass
class TextSpec:
    """What the objectives need to know about the tokenizer.

    word_start: (V,) bool, True for ids that begin a word (SentencePiece ``▁x``, WordPiece not ``##x``,
    byte-BPE ``Ġx``); specials count as word starts.
    """

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    word_start: Tensor = field(repr=False)

    @classmethod
    def from_tokenizer(cls, tok: Any) -> TextSpec:
        """From multiway's :class:`~multiway.tokenizers.TextTokenizer` or a ``transformers`` tokenizer."""
        if hasattr(tok, "sp"):  # multiway TextTokenizer (SentencePiece, XLM-R ids)
            starts = torch.ones(tok.vocab_size, dtype=torch.bool)
            for i in range(tok.vocab_size):
                if i in tok.special_ids or i == tok.unk_id:
                    continue
                starts[i] = tok.sp.id_to_piece(i - 1).startswith("\u2581")
            return cls(tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tuple(tok.special_ids), starts)
        vocab = len(tok)
        pieces = tok.convert_ids_to_tokens(list(range(vocab)))
        specials = tuple(sorted(set(tok.all_special_ids)))
        starts = torch.tensor([not p.startswith("##") for p in pieces], dtype=torch.bool)
        if any(p.startswith("\u0120") for p in pieces):  # byte-level BPE marks word starts instead
            starts = torch.tensor([p.startswith("\u0120") for p in pieces], dtype=torch.bool)
        starts[list(specials)] = True
        bos = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        return cls(vocab, tok.pad_token_id, bos, eos, tok.mask_token_id, specials, starts)


def _numpy_rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


# --- text -------------------------------------------------------------------------------------------------


def whole_word_mask(
    ids: Tensor, padding_mask: Tensor, spec: TextSpec, prob: float, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Whole-word masking: whole words are chosen until ``round(prob * n)`` tokens are; each chosen token
    becomes ``<mask>`` 80%, a random id 10%, unchanged 10% (BERT). ids (B, T) -> (masked ids, labels)."""
    out, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    special = torch.tensor(spec.special_ids, dtype=ids.dtype)
    for b in range(ids.shape[0]):
        row = ids[b]
        ok = (padding_mask[b] == 0) & ~torch.isin(row, special)
        words: list[list[int]] = []
        for t in torch.nonzero(ok).flatten().tolist():
            if not words or bool(spec.word_start[row[t]]) or words[-1][-1] != t - 1:
                words.append([t])
            else:
                words[-1].append(t)
        n = sum(len(w) for w in words)
        if n == 0:
            continue
        target = max(1, int(round(prob * n)))
        chosen: list[int] = []
        for w in rng.permutation(len(words)).tolist():
            if len(chosen) >= target:
                break
            if len(chosen) + len(words[w]) > target + 2 and chosen:  # do not overshoot much (BERT's rule)
                continue
            chosen.extend(words[w])
        for t in chosen:
            labels[b, t] = row[t]
            u = rng.random()
            if u < 0.8:
                out[b, t] = spec.mask_id
            elif u < 0.9:
                out[b, t] = int(rng.integers(4, spec.vocab_size))
    return out, labels


def mlm_mask(
    ids: Tensor, padding_mask: Tensor, spec: TextSpec, prob: float, whole_word: bool, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """MLM inputs and labels (``IGNORE_INDEX`` where not predicted). Token-level masking uses the data
    module's :func:`~multiway.data.masking.mask_text` with BERT's 80/10/10 split."""
    if whole_word:
        return whole_word_mask(ids, padding_mask, spec, prob, rng)
    masked, _, labels = mask_text(
        ids.cpu(), padding_mask.cpu(), prob, spec.special_ids, spec.mask_id, spec.vocab_size, rng, replace_probs=(0.8, 0.1, 0.1)
    )
    return masked.to(ids.device), labels.to(ids.device)


def span_corrupt(
    ids: Tensor,
    padding_mask: Tensor,
    spec: TextSpec,
    sentinel_start: int,
    num_sentinels: int,
    prob: float,
    mean_span: float,
    decoder_len: int,
    rng: np.random.Generator,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """T5 span corruption. ``round(prob * n)`` tokens in spans of mean length ``mean_span`` are cut out; each
    span becomes one sentinel ``<extra_i>`` (id ``sentinel_start + i``) in the encoder input; the decoder
    target is ``<extra_0> span_0 <extra_1> span_1 ... </s>``.

    Returns ``enc_ids (B, T)``, ``enc_padding (B, T)``, ``dec_input (B, L)`` (``<s>`` + target[:-1]) and
    ``dec_labels (B, L)`` (``IGNORE_INDEX`` on padding), ``L = decoder_len``.
    """
    B, T = ids.shape
    enc = torch.full_like(ids, spec.pad_id)
    enc_pad = torch.ones_like(padding_mask)
    dec_in = torch.full((B, decoder_len), spec.pad_id, dtype=ids.dtype, device=ids.device)
    dec_lab = torch.full((B, decoder_len), IGNORE_INDEX, dtype=ids.dtype, device=ids.device)
    special = torch.tensor(spec.special_ids, dtype=ids.dtype, device=ids.device)
    for b in range(B):
        row = ids[b].tolist()
        body = torch.nonzero((padding_mask[b] == 0) & ~torch.isin(ids[b], special)).flatten().tolist()
        n = len(body)
        num_noise = min(n, max(1, int(round(prob * n)))) if n else 0
        num_spans = min(num_sentinels, max(1, int(round(num_noise / mean_span)))) if num_noise else 0
        noise = set()
        if num_spans:
            # split num_noise into num_spans positive lengths, place spans at random non-overlapping starts
            cuts = sorted(rng.choice(np.arange(1, num_noise), size=num_spans - 1, replace=False).tolist()) if num_spans > 1 else []
            lengths = np.diff([0, *cuts, num_noise]).tolist()
            free = n - num_noise
            gaps = sorted(rng.choice(np.arange(free + 1), size=num_spans, replace=True).tolist())
            for i, (g, L) in enumerate(zip(gaps, lengths)):
                start = g + sum(lengths[:i])  # gaps sorted -> spans in order, never overlapping
                noise.update(body[start : start + L])
        enc_row, tgt, sent, prev_noise = [], [], 0, False
        for t, tok in enumerate(row):
            if padding_mask[b, t]:
                break
            if t in noise:
                if not prev_noise:
                    enc_row.append(sentinel_start + sent)
                    tgt.append(sentinel_start + sent)
                    sent += 1
                tgt.append(tok)
                prev_noise = True
            else:
                enc_row.append(tok)
                prev_noise = False
        tgt = tgt[: decoder_len - 1] + [spec.eos_id]
        inp = [spec.bos_id] + tgt[:-1]
        enc[b, : len(enc_row)] = torch.tensor(enc_row, dtype=ids.dtype)
        enc_pad[b, : len(enc_row)] = 0
        dec_in[b, : len(inp)] = torch.tensor(inp, dtype=ids.dtype)
        dec_lab[b, : len(tgt)] = torch.tensor(tgt, dtype=ids.dtype)
    return enc, enc_pad, dec_in, dec_lab


# --- image ------------------------------------------------------------------------------------------------


def mim_mask(batch_size: int, grid: int, ratio: float, rng: random.Random) -> Tensor:
    """Block-wise masks on the encoder's output grid (the data module's BEiT generator). -> (B, grid²) bool."""
    n = grid * grid
    k = max(1, int(round(ratio * n)))
    gen = BlockMaskingGenerator(grid, k, min_num_patches=max(1, min(16, k // 2)), exact=True)
    return torch.stack([gen(rng, flat=True).bool() for _ in range(batch_size)])


def mask_pixels(image: Tensor, mask: Tensor, grid: int) -> Tensor:
    """Set the pixels of masked cells to 0 (the normalised mean). image (B, 3, H, W), mask (B, grid²)."""
    m = mask.view(-1, 1, grid, grid).to(image.dtype)
    m = F.interpolate(m, size=image.shape[-2:], mode="nearest")
    return image * (1 - m)


def patch_pixel_targets(image: Tensor, grid: int) -> Tensor:
    """Per-cell normalised pixels (MAE's norm-pix target). (B, 3, H, W) -> (B, grid², 3·r²)."""
    B, C, H, W = image.shape
    r = H // grid
    x = image.float().reshape(B, C, grid, r, grid, r).permute(0, 2, 4, 3, 5, 1).reshape(B, grid * grid, r * r * C)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / (var + 1e-6).sqrt()


# --- ITM / ITC --------------------------------------------------------------------------------------------


def itc_logits(meter: METERModel, text_tokens: Tensor, image_tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """In-batch text-to-image similarity logits (B, B) from the dual projections of the unimodal tokens
    (text (B, T, Dt) with its padding mask, image (B, N, Dv); pooled by :meth:`METERModel.dual_embed_text` / ``_image``)."""
    t = meter.dual_embed_text(text_tokens, padding_mask)
    v = meter.dual_embed_image(image_tokens)
    return meter.logit_scale.float().clamp(max=math.log(100.0)).exp() * t @ v.t()


def itc_loss(logits: Tensor) -> Tensor:
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def sample_negative_images(sim: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
    """For each text i, an image index j != i: uniform, or ∝ softmax(sim[i]) (hard negatives, ALBEF-style)."""
    if batch_size < 2:
        raise ValueError("ITM needs a batch of at least 2 pairs to draw negatives")
    if sim is None:
        weights = torch.ones(batch_size, batch_size, device=device)
    else:
        weights = F.softmax(sim.detach().float(), dim=1)
    eye = torch.eye(batch_size, dtype=torch.bool, device=device)
    weights = (weights + 1e-8).masked_fill(eye, 0.0)
    return torch.multinomial(weights, 1).squeeze(1)


def load_mim_tokenizer(obj: ObjectiveConfig, grid: int) -> Any:
    """The frozen VQ-KD tokenizer for ``mim_target="vqkd"`` (a local file written by ``save_vqkd``, or a
    VQ-KD preset name for random codes); None for pixel regression. Its grid must equal the encoder's."""
    if not (obj.mim and obj.mim_target == "vqkd"):
        return None
    if not obj.vqkd_tokenizer:
        raise ValueError("objectives.mim_target='vqkd' needs objectives.vqkd_tokenizer (a local VQ-KD file or preset name)")
    from ..tokenizers.vqkd import VQKD_PRESETS, load_vqkd

    path = obj.vqkd_tokenizer
    if path not in VQKD_PRESETS and not Path(path).is_file():
        raise FileNotFoundError(
            f"objectives.vqkd_tokenizer={path!r}: no such local file; accepted values: a file written by save_vqkd "
            f"or a preset ({', '.join(VQKD_PRESETS)})"
        )
    tok = load_vqkd(path).eval().requires_grad_(False)
    if tok.config.grid != grid:
        raise ValueError(
            f"objectives.vqkd_tokenizer has a {tok.config.grid}x{tok.config.grid} code grid but the vision encoder's "
            f"output grid is {grid}x{grid}; choose matching img_size / patch sizes"
        )
    return tok


# --- the combined loss ------------------------------------------------------------------------------------


def pretraining_loss(
    model: METERForPretraining, batch: dict[str, Tensor], spec: TextSpec, obj: ObjectiveConfig, vqkd: Any = None
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the enabled objectives on one image-text batch. Returns (loss, logs).

    Encoder-only: MLM through the MLM head on the fused text tokens. Encoder-decoder: span corruption
    through the decoder. Both: ITM on pooled features (half the pairs get a negative image), MIM on the
    fused image tokens of the masked pass.
    """
    m = model.meter
    image, ids, pad = batch["image"], batch["language_tokens"], batch["padding_mask"]
    B, dev = ids.shape[0], ids.device
    rng = _numpy_rng()
    losses: dict[str, Tensor] = {}
    logs: dict[str, float] = {}

    # pass 1: corrupted text (+ masked image) -> MLM / span corruption, MIM
    if obj.mlm or obj.mim:
        img_in, cell_mask = image, None
        if obj.mim:
            cell_mask = mim_mask(B, m.vision.grid, obj.mim_ratio, random.Random(int(rng.integers(2**31)))).to(dev)
            img_in = mask_pixels(image, cell_mask, m.vision.grid)
        txt_in, txt_pad, mlm_labels, dec_in, dec_lab = ids, pad, None, None, None
        if obj.mlm and m.encoder_decoder:
            txt_in, txt_pad, dec_in, dec_lab = span_corrupt(
                ids, pad, spec, m.sentinel_start, m.config.decoder.num_sentinels, obj.mlm_probability, obj.span_length,
                m.config.decoder.max_len, rng,
            )
        elif obj.mlm:
            txt_in, mlm_labels = mlm_mask(ids, pad, spec, obj.mlm_probability, obj.whole_word_masking, rng)
        out = m.encode(img_in, txt_in, txt_pad)
        if obj.mlm:
            if m.encoder_decoder:
                logits, labels = m.decode(out, dec_in, dec_in == spec.pad_id), dec_lab
            else:
                logits, labels = model.mlm_head(out.text), mlm_labels
            losses["mlm"] = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            hit = labels != IGNORE_INDEX
            logs["mlm/acc"] = (logits.argmax(-1)[hit] == labels[hit]).float().mean().item() if hit.any() else 0.0
        if obj.mim:
            pred = model.mim_head(out.image[:, m.num_image_prefix :]).float()  # (B, grid², out)
            if obj.mim_target == "vqkd":
                if vqkd is None:
                    raise ValueError("objectives.mim_target='vqkd' needs objectives.vqkd_tokenizer (a local VQ-KD file)")
                with torch.no_grad():
                    codes = vqkd.get_codebook_indices((image.float() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1))
                losses["mim"] = F.cross_entropy(pred[cell_mask], codes[cell_mask])
                logs["mim/acc"] = (pred[cell_mask].argmax(-1) == codes[cell_mask]).float().mean().item()
            else:
                target = patch_pixel_targets(image, m.vision.grid)
                losses["mim"] = F.mse_loss(pred[cell_mask], target[cell_mask])

    # pass 2: clean text, half the images swapped -> ITM (+ ITC when negatives are hard)
    if obj.itm:
        text_tokens = m.encode_text_tokens(ids, pad)
        image_tokens = m.encode_image_tokens(image)
        sim = None
        if obj.itm_hard_negatives:
            logits_itc = itc_logits(m, text_tokens, image_tokens, pad)
            losses["itc"] = itc_loss(logits_itc)
            sim = logits_itc
        neg = sample_negative_images(sim, B, dev)
        is_pos = torch.rand(B, device=dev) < 0.5
        pick = torch.where(is_pos, torch.arange(B, device=dev), neg)
        out = m.fuse(text_tokens, image_tokens[pick], pad)
        logits = model.itm_head(m.features(out)).float()
        labels = is_pos.long()
        losses["itm"] = F.cross_entropy(logits, labels)
        logs["itm/acc"] = (logits.argmax(-1) == labels).float().mean().item()

    if not losses:
        raise ValueError("no objective enabled: set at least one of objectives.mlm, objectives.itm, objectives.mim")
    weights = {"mlm": obj.mlm_weight, "itm": obj.itm_weight, "mim": obj.mim_weight, "itc": obj.itc_weight}
    total = sum(weights[k] * v for k, v in losses.items())
    logs.update({f"{k}/loss": v.item() for k, v in losses.items()})
    return total, logs
