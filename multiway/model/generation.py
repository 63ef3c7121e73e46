"""Caption generation for :class:`BEiT3ForCaptioning`: beam search (the official evaluation, any beam count)
and plain greedy decoding, with the key/value cache.

Decoding follows the official BEiT-3 protocol (unilm ``CaptioningHandler.eval_batch``), batched over images
and beams with tensor operations instead of a per-example Python loop:

* step 1 feeds the image and ``[<s>, <mask>]``; every later step feeds ``[last word, <mask>]`` as text only,
  at text positions ``cur_len .. cur_len+1``, under the last two rows of the seq2seq mask;
* the next-word distribution is read at the ``<mask>`` slot; after each step the ``<mask>`` key/value is
  dropped from the cache, so the cache holds the image and the real prefix only;
* beam search keeps ``num_beams`` live hypotheses per image, closes one when ``</s>`` ranks among the
  candidates ahead of the ``num_beams``-th live continuation, scores a closed hypothesis as
  ``sum_logprob / len ** length_penalty`` (``len`` counts ``<s>`` and ``</s>``), and stops an image when no live
  beam can beat its best closed one, i.e. when its best closed score is at least the best live sum over
  ``(max_len - 1) ** length_penalty`` (``early_stopping=False``, the official setting), or as soon as one is
  closed (``early_stopping=True``);
* ``num_beams=1`` is this beam search with one beam, as in the official handler; ``generate(strategy="greedy")``
  is plain arg-max decoding that stops at the first ``</s>``;
* at the last step (``len == max_len - 1``) the best candidate closes its beam with ``</s>`` in place of the
  predicted word (the official handler's rule), so outputs are at most ``max_len`` tokens with ``<s>``/``</s>``.

Images whose decoding is over are dropped from the running batch (their cache rows are removed).
``use_cache=False`` recomputes the whole sequence each step; it gives the same result and exists to test
the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import BOS_ID, EOS_ID, PAD_ID
from .multiway import KVCache


@dataclass
class GenerationOutput:
    """sequences: (B, max_len) long — ``<s> w1 .. wn </s>`` then ``<pad>``; scores: (B,) length-normalised log-prob."""

    sequences: Tensor
    scores: Tensor


class _Stepper:
    """Runs decoding steps of a captioning model and returns next-token log-probs at the ``<mask>`` slot.

    With ``use_cache`` it follows the incremental protocol (cache of image + prefix); without, it re-encodes
    image + full prefix + ``<mask>`` each step. Rows can be re-indexed (beam re-ranking, pruning finished images).
    """

    def __init__(self, model: nn.Module, image: Tensor, mask_id: int, use_cache: bool, vocab_limit: int | None = None):
        self.model, self.image, self.mask_id, self.use_cache = model, image, mask_id, use_cache
        self.vocab_limit = vocab_limit
        self.cache: KVCache | None = model.beit3.new_kv_cache() if use_cache else None

    def _mask_col(self, n: int, device: torch.device) -> Tensor:
        return torch.full((n, 1), self.mask_id, dtype=torch.long, device=device)

    def first(self, bos: Tensor) -> Tensor:
        """bos: (N, 1) -> log-probs (N, V). Encodes the image (its keys/values are cached)."""
        ids = torch.cat([bos, self._mask_col(bos.shape[0], bos.device)], dim=1)
        logits, _ = self.model(self.image, ids, text_len=2, incremental_state=self.cache)
        if self.cache is not None:
            self.cache.crop(1)  # drop the <mask> slot
        return self._logp(logits)

    def _logp(self, logits: Tensor) -> Tensor:
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
        if self.vocab_limit is not None and self.vocab_limit < logp.shape[-1]:
            logp[:, self.vocab_limit :] = float("-inf")  # rows the tokenizer cannot decode (e.g. 64002..64009)
        return logp

    def next(self, prefix: Tensor) -> Tensor:
        """prefix: (N, n) real tokens so far, ``<s>`` first -> log-probs (N, V) for token ``n``."""
        n = prefix.shape[1]
        if self.cache is None:
            ids = torch.cat([prefix, self._mask_col(prefix.shape[0], prefix.device)], dim=1)
            logits, _ = self.model(self.image, ids)
            return self._logp(logits)
        ids = torch.cat([prefix[:, -1:], self._mask_col(prefix.shape[0], prefix.device)], dim=1)
        logits, _ = self.model(None, ids, text_len=n + 1, incremental_state=self.cache)
        self.cache.crop(1)
        return self._logp(logits)

    def select(self, index: Tensor) -> None:
        """Keep/reorder rows: the cache (or the images when recomputing)."""
        if self.cache is not None:
            self.cache.reorder(index)
        else:
            self.image = self.image.index_select(0, index)


def _check(
    model: nn.Module,
    image: Tensor,
    max_len: int,
    mask_id: int | None = None,
    length_penalty: float = 0.0,
    vocab_limit: int | None = None,
) -> None:
    """Refuse inputs decoding cannot use, naming the argument, what was expected and what was given."""
    if not hasattr(model, "mlm_head") or not hasattr(model, "beit3"):
        raise TypeError(f"caption generation needs a BEiT3ForCaptioning model, got {type(model).__name__}")
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a (B, C, H, W) float tensor, got {type(image).__name__}")
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a float tensor (normalised pixels), got dtype {image.dtype}")
    if image.shape[0] == 0:
        raise ValueError("image is an empty batch (B = 0): nothing to caption")
    cfg = model.config
    if image.shape[1] != cfg.in_chans:
        raise ValueError(f"image has {image.shape[1]} channels but the model takes {cfg.in_chans} (image shape {tuple(image.shape)})")
    if tuple(image.shape[-2:]) != (cfg.img_size, cfg.img_size):
        raise ValueError(f"image is {image.shape[-2]}x{image.shape[-1]} but the model was built for {cfg.img_size}x{cfg.img_size}")
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (<s>, one word, </s>), got {max_len}")
    table = model.beit3.encoder.embed_positions["B"].num_embeddings
    if max_len + 2 > table:
        raise ValueError(f"max_len={max_len} needs {max_len + 2} text position rows; the model has {table} (max_text_positions)")
    vocab = model.mlm_head.out_features
    if mask_id is not None and not 0 <= mask_id < cfg.vocab_size:
        raise ValueError(f"mask_id must be a token id in [0, {cfg.vocab_size}) (the model's vocab_size), got {mask_id}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")
    if vocab_limit is not None and not 3 <= vocab_limit <= vocab:
        raise ValueError(f"vocab_limit must be in [3, {vocab}] (the LM head's rows; <s>, <pad>, </s> come first), got {vocab_limit}")


@torch.no_grad()
def greedy_search(
    model: nn.Module,
    image: Tensor,
    mask_id: int,
    max_len: int = 32,
    length_penalty: float = 0.6,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> GenerationOutput:
    """Arg-max decoding. image: (B, C, H, W) -> :class:`GenerationOutput` with sequences (B, max_len).

    ``length_penalty`` only affects the returned scores (``sum_logprob / len ** length_penalty``).
    ``vocab_limit``: never emit ids >= this (the tokenizer's vocabulary size; default: any row of the head).
    """
    _check(model, image, max_len, mask_id, length_penalty, vocab_limit)
    batch, device = image.shape[0], image.device
    out = torch.full((batch, max_len), pad_id, dtype=torch.long, device=device)
    out_scores = torch.zeros(batch, device=device)
    tokens = torch.full((batch, max_len), pad_id, dtype=torch.long, device=device)
    tokens[:, 0] = bos_id
    sums = torch.zeros(batch, device=device)
    alive = torch.arange(batch, device=device)  # original example of each running row
    stepper = _Stepper(model, image, mask_id, use_cache, vocab_limit)
    for cur_len in range(2, max_len):
        logp = stepper.first(tokens[:, :1]) if cur_len == 2 else stepper.next(tokens[:, : cur_len - 1])
        best, word = logp.max(dim=-1)
        sums = sums + best
        ends = (word == eos_id) | (cur_len + 1 == max_len)
        if ends.any():
            rows = ends.nonzero().squeeze(1)
            finished = tokens[rows].clone()
            finished[:, cur_len - 1] = eos_id  # the official last step closes with </s>, dropping the word
            out[alive[rows]] = finished
            out_scores[alive[rows]] = sums[rows] / cur_len**length_penalty
        tokens[:, cur_len - 1] = word
        keep = (~ends).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < ends.numel():
            tokens, sums, alive = tokens[keep], sums[keep], alive[keep]
            stepper.select(keep)
    return GenerationOutput(out, out_scores)


@torch.no_grad()
def beam_search(
    model: nn.Module,
    image: Tensor,
    mask_id: int,
    num_beams: int = 3,
    max_len: int = 32,
    length_penalty: float = 0.6,
    early_stopping: bool = False,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> GenerationOutput:
    """Beam search (official protocol and scoring). image: (B, C, H, W) -> sequences (B, max_len), scores (B,).

    The image is encoded once per example; its cached keys/values are then copied to the ``num_beams`` rows.
    """
    _check(model, image, max_len, mask_id, length_penalty, vocab_limit)
    k = num_beams
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {k!r}")
    batch, device = image.shape[0], image.device
    out = torch.full((batch, max_len), pad_id, dtype=torch.long, device=device)
    best = torch.full((batch,), float("-inf"), device=device)  # best closed hypothesis per example
    has_hyp = torch.zeros(batch, dtype=torch.bool, device=device)
    alive = torch.arange(batch, device=device)  # original example of each running example
    tokens = torch.full((batch * k, max_len), pad_id, dtype=torch.long, device=device)
    tokens[:, 0] = bos_id
    beam_scores = torch.zeros(batch, k, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    beam_scores = beam_scores.view(-1)

    stepper = _Stepper(model, image, mask_id, use_cache, vocab_limit)
    for cur_len in range(2, max_len):
        if cur_len == 2:
            logp = stepper.first(tokens[::k, :1])  # one image encoding per example ...
            stepper.select(torch.arange(batch, device=device).repeat_interleave(k))  # ... copied to its beams
            logp = logp.repeat_interleave(k, dim=0)
        else:
            logp = stepper.next(tokens[:, : cur_len - 1])
        n, vocab = len(alive), logp.shape[-1]
        cand = (logp + beam_scores[:, None]).view(n, k * vocab)
        cand_scores, cand_idx = cand.topk(2 * k, dim=1)  # at most k of them can be </s>: k live ones remain
        cand_beam, cand_word = cand_idx // vocab, cand_idx % vocab
        rows = alive

        # An example is over when it holds a closed hypothesis no live beam can beat. The official bound
        # (BeamHypotheses.is_done) normalises the best live score by max_len - 1 (the length without <s>).
        bound = cand_scores[:, 0] / (max_len - 1) ** length_penalty
        done = has_hyp[rows] & (torch.ones_like(bound, dtype=torch.bool) if early_stopping else best[rows] >= bound)

        last = cur_len + 1 == max_len
        is_eos = cand_word == eos_id
        live_rank = torch.cumsum((~is_eos).long(), dim=1)  # live candidates up to and including this one
        if last:  # every candidate closes; the best one wins
            close_pos = torch.zeros(n, dtype=torch.long, device=device)
            closes = ~done
        else:  # the first </s> ranked ahead of the k-th live candidate closes its beam
            eligible = is_eos & (live_rank < k)
            closes = eligible.any(dim=1) & ~done
            close_pos = eligible.float().argmax(dim=1)
        close_score = cand_scores.gather(1, close_pos[:, None]).squeeze(1) / cur_len**length_penalty
        better = closes & (~has_hyp[rows] | (close_score > best[rows]))
        if better.any():
            ex = better.nonzero().squeeze(1)
            src = ex * k + cand_beam[ex, close_pos[ex]]
            finished = tokens[src].clone()
            finished[:, cur_len - 1] = eos_id
            finished[:, cur_len:] = pad_id
            out[rows[ex]] = finished
            best[rows[ex]] = close_score[ex]
            has_hyp[rows[ex]] = True
        if last:
            break

        # Continue with the k best live candidates (in rank order).
        order = torch.where(~is_eos, live_rank, 2 * k + 1)  # </s> candidates sort last
        pick = order.argsort(dim=1, stable=True)[:, :k]
        beam_scores = cand_scores.gather(1, pick).reshape(-1)
        src = (torch.arange(n, device=device)[:, None] * k + cand_beam.gather(1, pick)).reshape(-1)
        tokens = tokens[src]
        tokens[:, cur_len - 1] = cand_word.gather(1, pick).reshape(-1)
        stepper.select(src)

        if done.any():  # drop finished examples from the running batch
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            keep_rows = (keep[:, None] * k + torch.arange(k, device=device)).reshape(-1)
            tokens, beam_scores, alive = tokens[keep_rows], beam_scores[keep_rows], alive[keep]
            stepper.select(keep_rows)
    return GenerationOutput(out, best)


def generate(
    model: nn.Module,
    image: Tensor,
    mask_id: int,
    num_beams: int = 3,
    max_len: int = 32,
    length_penalty: float = 0.6,
    strategy: Literal["beam", "greedy"] = "beam",
    **kwargs,
) -> GenerationOutput:
    """Caption ``image`` (B, C, H, W) -> :class:`GenerationOutput` (sequences (B, max_len), scores (B,)).

    ``strategy="beam"`` (default) is the official evaluation for every ``num_beams``, 1 included: beam search
    with ``num_beams`` beams, where a ``</s>`` among the candidates closes a hypothesis while decoding goes on
    with the best live words, and the best length-normalised closed hypothesis is returned. With one beam this
    differs from greedy decoding: when ``</s>`` is the arg-max, greedy stops, beam search keeps the closed
    caption and still tries the runner-up word, which may end in a better-scoring longer caption.
    ``strategy="greedy"`` is plain arg-max decoding that stops at the first ``</s>`` (``num_beams`` must be 1).
    Other keyword arguments go to :func:`beam_search` / :func:`greedy_search`.
    """
    if strategy == "beam":
        return beam_search(model, image, mask_id, num_beams=num_beams, max_len=max_len, length_penalty=length_penalty, **kwargs)
    if strategy == "greedy":
        if num_beams != 1:
            raise ValueError(f"strategy='greedy' decodes one sequence per image; num_beams must be 1, got {num_beams}")
        if "early_stopping" in kwargs:
            raise TypeError("early_stopping applies to strategy='beam' only")
        return greedy_search(model, image, mask_id, max_len=max_len, length_penalty=length_penalty, **kwargs)
    raise ValueError(f"strategy must be 'beam' or 'greedy', got {strategy!r}")


__all__ = ["GenerationOutput", "beam_search", "generate", "greedy_search"]
