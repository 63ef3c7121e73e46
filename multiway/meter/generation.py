"""Caption decoding for the METER encoder-decoder: greedy and beam search on the decoder's key/value cache.

The options, output and scoring are those of BEiT-3's :mod:`multiway.model.generation` (``num_beams``,
``max_len``, ``length_penalty``, ``early_stopping``, ``use_cache``; :class:`GenerationOutput` with
``<s> w1 .. wn </s>`` rows of ``max_len`` and the score ``sum_logprob / len ** length_penalty``, ``len``
counting ``<s>`` and ``</s>``). At the last position a hypothesis closes with ``</s>`` in place of the word.

The fused image (with ``<s></s>`` as the encoder's text, METER's captioning input) is encoded once; each decoding
step then feeds one token through :meth:`Decoder.step`, whose cache holds the self-attention keys/values of
the prefix and the cross-attention keys/values of the fused memory. ``use_cache=False`` re-runs the decoder on
the whole prefix each step (the reference for the cache). Sentinel ids and ``<pad>`` are never generated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.generation import GenerationOutput
from .model import METERModel


class _MeterStepper:
    """Next-token log-probs (N, V) of the running rows; rows can be re-indexed (beams, finished examples)."""

    def __init__(self, meter: METERModel, image: Tensor, text_ids: Tensor | None, use_cache: bool):
        B = image.shape[0]
        if text_ids is None:
            text_ids = torch.tensor([[meter.bos_id, meter.eos_id]], device=image.device).expand(B, -1)
        self.meter, self.use_cache = meter, use_cache
        self.memory, self.memory_pad = meter.memory(meter.encode(image, text_ids))
        self.cache = meter.decoder.new_cache() if use_cache else None

    def _logp(self, hidden: Tensor) -> Tensor:
        m = self.meter
        logits = m.decoder.lm_head(hidden).float()
        logits[:, m.sentinel_start :] = float("-inf")  # sentinels are for span corruption only
        logits[:, m.pad_id] = float("-inf")
        return logits.log_softmax(-1)

    def __call__(self, prefix: Tensor) -> Tensor:
        """prefix (N, L) with ``<s>`` first -> log-probs (N, V) of token L."""
        dec = self.meter.decoder
        if self.use_cache:
            return self._logp(dec.step(prefix[:, -1:], prefix.shape[1] - 1, self.memory, self.memory_pad, self.cache)[:, 0])
        return self._logp(dec(prefix, self.memory, self.memory_pad)[:, -1])

    def select(self, index: Tensor) -> None:
        self.memory = self.memory[index]
        self.memory_pad = None if self.memory_pad is None else self.memory_pad[index]
        if self.cache is not None:
            for layer in self.cache:
                for key in layer:
                    layer[key] = layer[key][index]


def _check(meter: METERModel, image: Tensor, max_len: int) -> None:
    if not meter.encoder_decoder:
        raise ValueError(f"caption decoding needs architecture='encoder_decoder', got {meter.config.architecture!r}")
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    if not 3 <= max_len <= meter.decoder.max_len:
        raise ValueError(f"max_len must be in [3, decoder.max_len={meter.decoder.max_len}] (<s>, a word, </s>), got {max_len}")


@torch.no_grad()
def greedy_search(
    meter: METERModel, image: Tensor, max_len: int = 32, length_penalty: float = 0.6, use_cache: bool = True,
    text_ids: Tensor | None = None,
) -> GenerationOutput:
    """Arg-max decoding: image (B, 3, H, W) -> sequences (B, max_len), scores (B,)."""
    _check(meter, image, max_len)
    B, dev = image.shape[0], image.device
    bos, eos, pad = meter.bos_id, meter.eos_id, meter.pad_id
    out = torch.full((B, max_len), pad, dtype=torch.long, device=dev)
    out_scores = torch.zeros(B, device=dev)
    tokens = torch.full((B, max_len), pad, dtype=torch.long, device=dev)
    tokens[:, 0] = bos
    sums = torch.zeros(B, device=dev)
    alive = torch.arange(B, device=dev)
    step = _MeterStepper(meter, image, text_ids, use_cache)
    for cur in range(1, max_len):  # position being filled
        best, word = step(tokens[:, :cur]).max(dim=-1)
        sums = sums + best
        if cur == max_len - 1:  # the last position closes with </s> in place of the word
            word = torch.full_like(word, eos)
        tokens[:, cur] = word
        ends = word == eos
        if ends.any():
            rows = ends.nonzero().squeeze(1)
            out[alive[rows]] = tokens[rows]
            out_scores[alive[rows]] = sums[rows] / (cur + 1) ** length_penalty
        keep = (~ends).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < ends.numel():
            tokens, sums, alive = tokens[keep], sums[keep], alive[keep]
            step.select(keep)
    return GenerationOutput(out, out_scores)


@torch.no_grad()
def beam_search(
    meter: METERModel, image: Tensor, num_beams: int = 3, max_len: int = 32, length_penalty: float = 0.6,
    early_stopping: bool = False, use_cache: bool = True, text_ids: Tensor | None = None,
) -> GenerationOutput:
    """Beam search: ``num_beams`` live hypotheses per image; ``</s>`` closes a hypothesis when it ranks ahead of the
    ``num_beams``-th live continuation. An image is over when no live beam can beat its best closed hypothesis
    (``early_stopping=False``) or as soon as one is closed (``early_stopping=True``).
    image (B, 3, H, W) -> sequences (B, max_len), scores (B,)."""
    _check(meter, image, max_len)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    k, B, dev = num_beams, image.shape[0], image.device
    bos, eos, pad = meter.bos_id, meter.eos_id, meter.pad_id
    out = torch.full((B, max_len), pad, dtype=torch.long, device=dev)
    best = torch.full((B,), float("-inf"), device=dev)
    step = _MeterStepper(meter, image, text_ids, use_cache)
    step.select(torch.arange(B, device=dev).repeat_interleave(k))  # the image is encoded once, copied to its beams
    tokens = torch.full((B * k, max_len), pad, dtype=torch.long, device=dev)
    tokens[:, 0] = bos
    beam_scores = torch.zeros(B, k, device=dev)
    beam_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    beam_scores = beam_scores.view(-1)
    alive = torch.arange(B, device=dev)
    for cur in range(1, max_len):
        logp = step(tokens[:, :cur])
        n, vocab = len(alive), logp.shape[-1]
        last = cur == max_len - 1
        if last:  # every hypothesis closes here, with </s> in place of the word
            logp = logp.max(dim=-1, keepdim=True).values.expand(-1, vocab).clone()
            logp[:, :eos], logp[:, eos + 1 :] = float("-inf"), float("-inf")
        cand_scores, cand_idx = (logp + beam_scores[:, None]).view(n, k * vocab).topk(2 * k, dim=1)
        cand_beam, cand_word = cand_idx // vocab, cand_idx % vocab
        is_eos = cand_word == eos
        live_rank = torch.cumsum((~is_eos).long(), dim=1)
        closing = is_eos & ((live_rank < k) | last)
        for ex in range(n):  # close hypotheses (few per step), keep each image's best
            for j in closing[ex].nonzero().flatten().tolist():
                score = cand_scores[ex, j].item() / (cur + 1) ** length_penalty
                if score > best[alive[ex]]:
                    row = tokens[ex * k + cand_beam[ex, j]].clone()
                    row[cur] = eos
                    out[alive[ex]], best[alive[ex]] = row, score
        if last:
            break
        order = torch.where(~is_eos, live_rank, 2 * k + 1)
        pick = order.argsort(dim=1, stable=True)[:, :k]
        beam_scores = cand_scores.gather(1, pick).reshape(-1)
        src = (torch.arange(n, device=dev)[:, None] * k + cand_beam.gather(1, pick)).reshape(-1)
        tokens = tokens[src]
        tokens[:, cur] = cand_word.gather(1, pick).reshape(-1)
        step.select(src)
        # log-probs are <= 0, so a live beam's final score is at most its sum over the longest length
        bound = beam_scores.view(n, k).max(dim=1).values / max_len**length_penalty
        done = torch.isfinite(best[alive]) & (torch.ones_like(bound, dtype=torch.bool) if early_stopping else best[alive] >= bound)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows = (keep[:, None] * k + torch.arange(k, device=dev)).reshape(-1)
            tokens, beam_scores, alive = tokens[rows], beam_scores[rows], alive[keep]
            step.select(rows)
    return GenerationOutput(out, best)


def generate(
    meter: METERModel, image: Tensor, num_beams: int = 1, max_len: int = 32, length_penalty: float = 0.6,
    early_stopping: bool = False, use_cache: bool = True, text_ids: Tensor | None = None,
) -> GenerationOutput:
    """Greedy when ``num_beams == 1`` (as BEiT-3's ``generate``), else beam search."""
    if num_beams == 1:
        return greedy_search(meter, image, max_len, length_penalty, use_cache, text_ids)
    return beam_search(meter, image, num_beams, max_len, length_penalty, early_stopping, use_cache, text_ids)
