"""The Multiway Transformer backbone (BEiT-3).

One Transformer encoder whose sublayers hold per-modality *experts*: ``A`` for vision tokens, ``B`` for
language tokens and, in the paper's variant, ``C`` for every token of a fused image-text input in the top
layers. A sequence is ``[vision tokens; text tokens]``. Inside the encoder the residual stream is kept as one
contiguous tensor per modality and joined only for the joint softmax attention, so each expert runs one
dense matmul on its own tokens with no gather/scatter or slice copies, and routing is decided per call
(no module state: safe under ``torch.compile`` and concurrent calls with different inputs).

Module and parameter names follow the official release (``encoder.layers.0.self_attn.q_proj.A.weight``,
``encoder.embed_positions.B.weight`` ...), so official state dicts load without renaming. Numerics follow
the official implementation: pre-LN with sub-LayerNorms (Magneto), learned absolute positions with the
fairseq offset of 2 restarting per modality, padded tokens zeroed after the embedding, padded keys never
attended to. Attention runs through ``F.scaled_dot_product_attention`` with one combined boolean mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from .config import MultiwayConfig
from .recompute import RecomputePolicy, block_policy, run_block
from .validation import check_backbone_inputs, checking

# Official position tables reserve rows 0 and 1 (fairseq's padding offset); real positions start at 2.
POSITION_OFFSET = 2


class Experts(nn.ModuleDict):
    """Per-modality copies of one module: ``A`` (vision), ``B`` (language), optionally ``C`` (vision-language).

    Routing happens in :class:`MultiwayBlock`, which keeps the residual stream as one contiguous segment per
    modality and calls ``experts[name]`` on each, so every expert runs one dense matmul and no slice is copied.
    """

    def __init__(self, make: callable, names: tuple[str, ...] = ("A", "B")):
        super().__init__({name: make() for name in names})


class FeedForward(nn.Module):
    """``fc2(subLN(GELU(fc1(x))))`` — the Magneto FFN with a LayerNorm on the hidden activations."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


def _linear(dim: int) -> nn.Linear:
    return nn.Linear(dim, dim)


def _pick(module: nn.Module, expert: str) -> nn.Module:
    """The expert ``expert`` of an :class:`Experts`, or the module itself when it is shared."""
    return module[expert] if isinstance(module, Experts) else module


class KVCache:
    """Per-layer keys/values for incremental decoding; each entry is (B, heads, length, head_dim).

    ``crop(n)`` drops the last ``n`` positions (the beam-search protocol drops the ``<mask>`` slot after each
    step) and ``reorder(index)`` selects batch rows (beam re-ranking).
    """

    def __init__(self, num_layers: int):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        # Whether any cached position is a vision token; decides "fused" routing for the paper variant.
        self.has_vision = False

    def __len__(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def crop(self, drop_last: int) -> None:
        self.keys = [k[:, :, :-drop_last] for k in self.keys]
        self.values = [v[:, :, :-drop_last] for v in self.values]

    def reorder(self, index: Tensor) -> None:
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]

    @classmethod
    def from_incremental_state(cls, state: dict, num_layers: int) -> KVCache:
        """Read the official ``incremental_state`` layout: ``{layer: {"prev_key": (B,H,L,hd), "prev_value": ...}}``."""
        cache = cls(num_layers)
        for i in range(num_layers):
            layer = state.get(i) or {}
            cache.keys[i], cache.values[i] = layer.get("prev_key"), layer.get("prev_value")
        # In the official protocol a non-empty cache always starts with the image.
        cache.has_vision = cache.keys[0] is not None
        return cache

    def to_incremental_state(self, state: dict) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            state[i] = {"prev_key": k, "prev_value": v}


class MultiwaySelfAttention(nn.Module):
    """Multi-head self-attention over all segments jointly, with per-expert (or shared) projections and sub-LN."""

    def __init__(self, cfg: MultiwayConfig, shared: bool):
        super().__init__()
        dim, eps = cfg.embed_dim, cfg.layer_norm_eps
        self.num_heads = cfg.num_heads
        if shared:
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (_linear(dim) for _ in range(4))
            self.inner_attn_ln = nn.LayerNorm(dim, eps=eps)
        else:
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Experts(lambda: _linear(dim)) for _ in range(4))
            self.inner_attn_ln = Experts(lambda: nn.LayerNorm(dim, eps=eps))

    def forward(
        self,
        segments: list[Tensor],
        experts: list[str],
        attn_mask: Tensor | None,
        layer_index: int = 0,
        kv_cache: KVCache | None = None,
    ) -> list[Tensor]:
        """segments: per-modality (B, L_i, D), already layer-normed; attn_mask: bool, broadcastable to
        (B, heads, L, L_keys), True = may attend. Returns the attention output per segment."""
        batch = segments[0].shape[0]

        def project(module: nn.Module) -> Tensor:
            parts = [_pick(module, e)(h) for h, e in zip(segments, experts)]
            joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            return joined.view(batch, joined.shape[1], self.num_heads, -1).transpose(1, 2)

        q, k, v = project(self.q_proj), project(self.k_proj), project(self.v_proj)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_index, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, hd)
        outputs, start = [], 0
        for h, e in zip(segments, experts):
            length = h.shape[1]
            o = out[:, :, start : start + length].transpose(1, 2).reshape(batch, length, -1)
            outputs.append(_pick(self.out_proj, e)(_pick(self.inner_attn_ln, e)(o)))
            start += length
        return outputs


class MultiwayBlock(nn.Module):
    """Pre-LN Transformer block: ``x += attn(LN(x))``; ``x += FFN(LN(x))``, LNs and FFN per expert."""

    def __init__(self, cfg: MultiwayConfig, index: int, drop_path: float):
        super().__init__()
        dim, eps = cfg.embed_dim, cfg.layer_norm_eps
        self.index = index
        # The paper's vision-language expert lives in the top `vl_expert_layers` layers only.
        self.has_vl_expert = index >= cfg.depth - cfg.vl_expert_layers
        ffn_experts = ("A", "B", "C") if self.has_vl_expert else ("A", "B")
        if cfg.shared_attention:
            self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        else:
            self.self_attn_layer_norm = Experts(lambda: nn.LayerNorm(dim, eps=eps))
        self.self_attn = MultiwaySelfAttention(cfg, shared=cfg.shared_attention)
        self.final_layer_norm = Experts(lambda: nn.LayerNorm(dim, eps=eps), ffn_experts)
        self.ffn = Experts(lambda: FeedForward(dim, cfg.ffn_dim, eps), ffn_experts)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        segments: list[Tensor],
        experts: list[str],
        attn_mask: Tensor | None,
        fused: bool = False,
        kv_cache: KVCache | None = None,
    ) -> list[Tensor]:
        """segments: the residual stream, one contiguous (B, L_i, D) tensor per modality, routed to ``experts``."""
        normed = [_pick(self.self_attn_layer_norm, e)(x) for x, e in zip(segments, experts)]
        attn = self.self_attn(normed, experts, attn_mask, self.index, kv_cache)
        segments = [x + self.drop_path(a) for x, a in zip(segments, attn)]
        ffn_experts = ["C"] * len(experts) if (fused and self.has_vl_expert) else experts
        return [x + self.drop_path(self.ffn[e](self.final_layer_norm[e](x))) for x, e in zip(segments, ffn_experts)]


class VisionEmbedding(nn.Module):
    """Patchify with a strided conv, optionally replace masked patches by ``mask_token``, prepend ``cls_token``."""

    def __init__(self, cfg: MultiwayConfig):
        super().__init__()
        self.img_size, self.patch_size = cfg.img_size, cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, image: Tensor, masked_positions: Tensor | None = None) -> Tensor:
        """image: (B, C, H, W) with H = W = img_size; masked_positions: (B, N) bool/0-1. Returns (B, 1+N, D)."""
        if image.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"image is {tuple(image.shape[-2:])} but the model was built for {self.img_size}x{self.img_size}; "
                "resize the input or build the model with img_size=... (checkpoints interpolate their position table)"
            )
        x = self.proj(image).flatten(2).transpose(1, 2)
        if masked_positions is not None:
            w = masked_positions.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)


class PositionTables(nn.ModuleDict):
    """The two learned absolute position tables: ``A`` (vision, N+3 rows) and ``B`` (text)."""

    def __init__(self, cfg: MultiwayConfig):
        super().__init__(
            {
                "A": nn.Embedding(cfg.num_vision_tokens + POSITION_OFFSET, cfg.embed_dim),
                "B": nn.Embedding(cfg.max_text_positions, cfg.embed_dim),
            }
        )


class Encoder(nn.Module):
    """Holds the position tables, the blocks and the final LayerNorm (official names under ``encoder.``)."""

    def __init__(self, cfg: MultiwayConfig):
        super().__init__()
        self.embed_positions = PositionTables(cfg)
        # Linear ramp as in the official code (layer 0 has rate 0); plain Python so it also works on meta.
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.layers = nn.ModuleList(MultiwayBlock(cfg, i, rates[i]) for i in range(cfg.depth))
        eps = cfg.layer_norm_eps
        self.layer_norm = Experts(lambda: nn.LayerNorm(cfg.embed_dim, eps=eps)) if cfg.normalize_output else None


@dataclass
class MultiwayOutput:
    """What the backbone returns.

    last_hidden_state: (B, L, D) — vision tokens (CLS first) then text tokens.
    num_vision: number of leading vision tokens in ``last_hidden_state`` (0 for text-only input).
    padding_mask: (B, L) bool, True = padding, or None when nothing is padded.
    hidden_states: per-layer inputs plus the last layer's output when requested, else empty.
    token_embeddings: the token embeddings before positions are added, (B, L, D), when requested, else None.
    """

    last_hidden_state: Tensor
    num_vision: int
    padding_mask: Tensor | None = None
    hidden_states: tuple[Tensor, ...] = field(default_factory=tuple)
    token_embeddings: Tensor | None = None


def init_linear_and_norm(module: nn.Module, std: float = 0.02) -> None:
    """The official fine-tuning wrapper's init: Linear ~ trunc_normal(std, cut at ±std; official 0.02), bias 0;
    LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std, a=-std, b=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# The keyword arguments of the official backbone call (torchscale ``BEiT3.forward``), in its order.
OFFICIAL_ARGUMENTS = ("textual_tokens", "visual_tokens", "text_padding_position", "attn_mask", "vision_masked_position",
                      "incremental_state", "positions")


class MultiwayTransformer(nn.Module):
    """The BEiT-3 backbone: text/vision embeddings and a Multiway Transformer encoder.

    The five adaptation modes are calls on this one module: :meth:`encode_image` (vision encoder),
    :meth:`encode_text` (language encoder), :meth:`encode_fused` (fusion encoder); the dual encoder and
    image-to-text generation add small heads on top (see :mod:`multiway.model.heads`) and use
    :meth:`forward` with ``attn_mask`` / ``kv_cache``.
    """

    def __init__(self, cfg: MultiwayConfig):
        super().__init__()
        self.config = cfg
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.recompute_norms = cfg.recompute_norms
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the official code does (:func:`init_linear_and_norm` with ``config.init_std``; text
        embedding ~ N(0, D^-1/2)), except the position tables: trunc_normal(``config.position_init_std``) unless
        that is None (official N(0, 1))."""
        init_linear_and_norm(self, self.config.init_std)
        nn.init.normal_(self.text_embed.weight, std=self.config.embed_dim**-0.5)
        std = self.config.position_init_std
        for table in self.encoder.embed_positions.values():
            if std is None:
                table.reset_parameters()
            else:
                trunc_normal_(table.weight, std=std)

    @property
    def recompute_policy(self) -> RecomputePolicy:
        """What the blocks keep for backward in training (see :mod:`multiway.model.recompute`); "none" in eval."""
        if not self.training:
            return "none"
        return block_policy(self.grad_checkpointing, self.recompute_norms)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.num_layers)

    def forward(
        self,
        image: Tensor | None = None,
        text_ids: Tensor | None = None,
        text_padding_mask: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        image_masked_positions: Tensor | None = None,
        text_positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_token_embeddings: bool = False,
        mask_padded_keys: bool = True,
        **official_arguments: Any,
    ) -> MultiwayOutput | dict[str, Any]:
        """Encode an image, a text, or both (fused).

        Called with the official keyword arguments instead (``textual_tokens=``, ``visual_tokens=``,
        ``text_padding_position=``, ``attn_mask=``, ``vision_masked_position=``, ``incremental_state=``,
        ``positions=``), it runs :meth:`forward_official` and returns the official dict, so scripts written
        against the official backbone keep working.

        Args:
            image: (B, C, H, W) float.
            text_ids: (B, T) long token ids.
            text_padding_mask: (B, T), nonzero/True = padding.
            attn_mask: bool (L, L_keys) or (B, L, L_keys), True = may attend; L_keys includes cached keys.
            image_masked_positions: (B, N) patches replaced by the mask token (masked image modeling).
            text_positions: (B or 1, T) rows of the text position table (default ``2 .. T+1``); used when
                decoding incrementally.
            kv_cache: a :class:`KVCache`; keys/values of this call are appended to it.
            output_hidden_states: also return every layer's input and the last layer's output.
            output_token_embeddings: also return the token embeddings before positions are added.
            mask_padded_keys: hide padded tokens from attention (the official incremental path only zeroes them).

        Returns:
            :class:`MultiwayOutput` with ``last_hidden_state`` of shape (B, [1+N] + [T], D).
        """
        if official_arguments:
            unknown = set(official_arguments) - set(OFFICIAL_ARGUMENTS)
            if unknown:
                raise TypeError(f"unknown argument(s) {sorted(unknown)}; the official call takes {list(OFFICIAL_ARGUMENTS)}")
            if image is not None or text_ids is not None or text_padding_mask is not None:
                raise TypeError("mix of argument styles: pass image/text_ids/text_padding_mask or the official "
                                "textual_tokens/visual_tokens/text_padding_position, not both")
            if attn_mask is not None:
                official_arguments["attn_mask"] = attn_mask
            return self.forward_official(**official_arguments)
        if image is None and text_ids is None:
            raise ValueError("pass an image, text_ids or both")
        tables = self.encoder.embed_positions
        if checking():  # argument checks (shapes, dtypes, id ranges on CPU); skipped under torch.compile
            cached = len(kv_cache) if kv_cache is not None else 0
            check_backbone_inputs(self.config, image, text_ids, text_padding_mask, attn_mask, image_masked_positions,
                                  text_positions, cached, tables["B"].num_embeddings)
        parts, embeddings, num_vision = [], [], 0
        if image is not None:
            x_img = self.vision_embed(image, image_masked_positions)
            embeddings.append(x_img)
            num_vision = x_img.shape[1]
            rows = torch.arange(POSITION_OFFSET, POSITION_OFFSET + num_vision, device=x_img.device)
            parts.append(x_img + tables["A"](rows))
        padding_mask = None
        if text_ids is not None:
            x_txt = self.text_embed(text_ids)
            embeddings.append(x_txt)
            if text_positions is None:
                if text_ids.shape[1] + POSITION_OFFSET > tables["B"].num_embeddings:
                    raise ValueError(
                        f"text of {text_ids.shape[1]} tokens does not fit the text position table of "
                        f"{tables['B'].num_embeddings} rows (max_text_positions); at most "
                        f"{tables['B'].num_embeddings - POSITION_OFFSET} tokens fit"
                    )
                text_positions = torch.arange(POSITION_OFFSET, POSITION_OFFSET + text_ids.shape[1], device=text_ids.device)
            x_txt = x_txt + tables["B"](text_positions)
            # Skipping an all-zero padding mask keeps the mask-free (flash) attention path; under
            # torch.compile the data-dependent check is skipped to avoid a graph break.
            if text_padding_mask is not None and (torch.compiler.is_compiling() or text_padding_mask.any()):
                text_pad = text_padding_mask.bool()
                x_txt = x_txt.masked_fill(text_pad.unsqueeze(-1), 0.0)
                padding_mask = text_pad if image is None else F.pad(text_pad, (num_vision, 0), value=False)
            parts.append(x_txt)
        experts = (["A"] if image is not None else []) + (["B"] if text_ids is not None else [])
        mask = self._combine_masks(attn_mask, padding_mask if mask_padded_keys else None, kv_cache)
        fused = num_vision > 0 and text_ids is not None
        if kv_cache is not None:
            fused = fused or (kv_cache.has_vision and text_ids is not None)
        join = lambda segs: segs[0] if len(segs) == 1 else torch.cat(segs, dim=1)  # noqa: E731
        segments, hidden_states = parts, []
        for layer in self.encoder.layers:
            if output_hidden_states:
                hidden_states.append(join(segments))
            segments = run_block(layer, self.recompute_policy, segments, experts, mask, fused, kv_cache)
        if kv_cache is not None and num_vision > 0:
            kv_cache.has_vision = True
        if self.encoder.layer_norm is not None:
            segments = [self.encoder.layer_norm[e](x) for x, e in zip(segments, experts)]
        x = join(segments)
        if output_hidden_states:
            hidden_states.append(x)
        token_embeddings = (embeddings[0] if len(embeddings) == 1 else torch.cat(embeddings, dim=1)) if output_token_embeddings else None
        return MultiwayOutput(x, num_vision, padding_mask, tuple(hidden_states), token_embeddings)

    def forward_official(
        self,
        textual_tokens: Tensor | None = None,
        visual_tokens: Tensor | None = None,
        text_padding_position: Tensor | None = None,
        attn_mask: Tensor | None = None,
        vision_masked_position: Tensor | None = None,
        incremental_state: dict | None = None,
        positions: Tensor | None = None,
    ) -> dict[str, Any]:
        """The official backbone call (torchscale ``BEiT3.forward``), on this module's weights.

        Args:
            textual_tokens: (B, T) token ids, or None.
            visual_tokens: (B, C, H, W) images, or None.
            text_padding_position: (B, T), nonzero = padding.
            attn_mask: (L, L_keys), nonzero = blocked (the official convention; :meth:`forward` takes True = may
                attend).
            vision_masked_position: (B, N), nonzero = patch replaced by the mask token.
            incremental_state: the official key/value cache, ``{layer: {"prev_key", "prev_value"}}``; updated in
                place. Missing layer entries are created, as the official captioning head does. As in the
                official code, padding is then zeroed but not masked out of attention.
            positions: rows of the position table for a single-modality call (default ``2 .. L+1``); the official
                decoding protocol passes them for text-only steps.

        Returns:
            the official dict: ``encoder_out`` (B, L, D); ``encoder_embedding`` (B, L, D), the token embeddings
            before positions; ``encoder_padding_mask`` (B, L); ``encoder_states`` (empty: the official call never
            asks for them); ``l_aux`` (one None per layer: no mixture-of-experts); ``multiway_split_position``
            (-1 vision only, 0 text only, else the number of vision tokens).
        """
        if textual_tokens is None and visual_tokens is None:
            raise ValueError("pass textual_tokens, visual_tokens or both")
        if positions is not None and visual_tokens is not None:
            raise ValueError("positions is supported for text-only calls (the official decoding protocol); "
                             "vision positions always start at row 2")
        allowed = None if attn_mask is None else attn_mask == 0
        cache = None
        if incremental_state is not None:
            for layer in range(self.num_layers):
                incremental_state.setdefault(layer, {})
            cache = KVCache.from_incremental_state(incremental_state, self.num_layers)
        text_positions = None
        if positions is not None:
            text_positions = positions if positions.dim() == 2 else positions.unsqueeze(0)
        out = self(visual_tokens, textual_tokens, text_padding_position, attn_mask=allowed,
                   image_masked_positions=vision_masked_position, text_positions=text_positions, kv_cache=cache,
                   output_token_embeddings=True, mask_padded_keys=incremental_state is None)
        if cache is not None:
            cache.to_incremental_state(incremental_state)
        batch, length = out.last_hidden_state.shape[:2]
        device = out.last_hidden_state.device
        if textual_tokens is None:
            padding, split = torch.zeros(batch, length, dtype=torch.bool, device=device), -1
        elif visual_tokens is None:
            split = 0
            padding = text_padding_position if text_padding_position is not None else torch.zeros(
                batch, length, dtype=torch.bool, device=device)
        else:
            split = out.num_vision
            padding = torch.zeros(batch, length, dtype=torch.bool, device=device) if text_padding_position is None else torch.cat(
                [torch.zeros(batch, out.num_vision, dtype=torch.bool, device=device), text_padding_position], dim=1)
        return {
            "encoder_out": out.last_hidden_state,
            "encoder_embedding": out.token_embeddings,
            "encoder_padding_mask": padding,
            "encoder_states": [],
            "l_aux": [None] * self.num_layers,
            "multiway_split_position": split,
        }

    @staticmethod
    def _combine_masks(attn_mask: Tensor | None, padding_mask: Tensor | None, kv_cache: KVCache | None) -> Tensor | None:
        """One boolean SDPA mask, True = may attend, broadcastable to (B, 1, L, L_keys)."""
        mask = None
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise TypeError("attn_mask must be bool with True = may attend")
            mask = attn_mask.unsqueeze(-3) if attn_mask.dim() == 3 else attn_mask
        if padding_mask is not None:
            keys_ok = ~padding_mask
            if kv_cache is not None and len(kv_cache):
                # Cached positions were never padding: the decoding protocol caches image + real prefix only.
                keys_ok = F.pad(keys_ok, (len(kv_cache), 0), value=True)
            keys_ok = keys_ok[:, None, None, :]
            mask = keys_ok if mask is None else mask & keys_ok
        return mask

    # --- adaptation modes -------------------------------------------------------------------------------

    def encode_image(self, image: Tensor, masked_positions: Tensor | None = None) -> Tensor:
        """Vision encoder. image: (B, C, H, W) -> (B, 1+N, D); token 0 is CLS. Only vision experts run."""
        return self(image=image, image_masked_positions=masked_positions).last_hidden_state

    def encode_text(self, text_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Language encoder. text_ids: (B, T) -> (B, T, D); token 0 is ``<s>``. Only language experts run."""
        return self(text_ids=text_ids, text_padding_mask=padding_mask).last_hidden_state

    def encode_fused(
        self,
        image: Tensor,
        text_ids: Tensor,
        padding_mask: Tensor | None = None,
        image_masked_positions: Tensor | None = None,
    ) -> MultiwayOutput:
        """Fusion encoder: one joint attention over ``[vision; text]``. Output (B, 1+N+T, D)."""
        return self(image, text_ids, padding_mask, image_masked_positions=image_masked_positions)

    # --- dense features (detection, segmentation) ----------------------------------------------------------

    def vision_positions(self, grid: tuple[int, int]) -> Tensor:
        """Position rows of CLS + an (h, w) patch grid, (1 + h*w, D).

        The native grid (``img_size / patch_size`` square) reads the table as stored; any other grid resizes the
        stored square grid bicubically (``align_corners=False``, as :func:`interpolate_vision_positions`). A
        resized table is cached per grid while no gradient flows into the table (inference, frozen table); the
        cache key holds the table's version counter, so an optimizer step or a checkpoint load invalidates it.
        When the table is trained the resize runs in every call, inside the autograd graph.
        """
        table = self.encoder.embed_positions["A"].weight
        side = self.config.img_size // self.config.patch_size
        grid = (int(grid[0]), int(grid[1]))
        if grid == (side, side):
            return table[POSITION_OFFSET:]
        tracked = torch.is_grad_enabled() and table.requires_grad
        cache = self.__dict__.setdefault("_resized_positions", {})
        key = (table.data_ptr(), table._version, table.dtype)
        if not tracked and grid in cache and cache[grid][0] == key:
            return cache[grid][1]
        extra = POSITION_OFFSET + 1
        square = table[extra:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
        rows = torch.cat([table[POSITION_OFFSET:extra], resized.flatten(2).transpose(1, 2)[0].to(table.dtype)], dim=0)
        if not tracked:
            cache[grid] = (key, rows)  # no graph: built without gradient into the table
        return rows

    def is_window_block(self, index: int) -> bool:
        """Whether block ``index`` attends within windows on the dense path (see ``MultiwayConfig.window_size``)."""
        interval = self.config.global_attention_interval
        return self.config.window_size > 0 and not (interval > 0 and (index + 1) % interval == 0)

    def forward_intermediates(
        self,
        image: Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ) -> list[Tensor] | list[tuple[Tensor, Tensor]] | tuple[Tensor, list]:
        """Patch-token maps of chosen blocks for dense tasks, following timm's ``forward_intermediates``.

        Args:
            image: (B, C, H, W) with H and W multiples of ``patch_size`` (square or not; the position table is
                resized to the grid by :meth:`vision_positions`).
            indices: blocks whose outputs to return: None = every block, an int ``n`` = the last ``n`` blocks, a
                list = those block indices (negative counts from the end).
            norm: apply the encoder's final (vision) LayerNorm to each returned map.
            stop_early: do not run the blocks after the last requested one.
            output_fmt: ``"NCHW"`` -> maps (B, D, H/p, W/p); ``"NLC"`` -> (B, H/p * W/p, D).
            intermediates_only: return only the list of maps.
            return_prefix_tokens: return each map as ``(map, cls)`` with ``cls`` (B, 1, D).

        Returns:
            the list of maps (in block order), or ``(tokens, maps)`` where ``tokens`` (B, 1 + H/p * W/p, D) is the
            last run block's output after the final LayerNorm — at the native size with global attention it
            equals :meth:`encode_image`.

        With ``config.window_size > 0`` the window blocks (:meth:`is_window_block`) split the patch grid, padded
        at the bottom/right to a multiple of the window, into windows that attend within themselves; padded keys
        are masked out. CLS joins every window as its first token and leaves as the mean of its window outputs,
        so one window covering the grid is global attention. Drop path then acts per window.
        """
        if image.dim() != 4 or image.shape[1] != self.config.in_chans:
            raise ValueError(f"image must be (B, {self.config.in_chans}, H, W), got shape {tuple(image.shape)}")
        patch = self.config.patch_size
        height, width = image.shape[-2:]
        if height % patch or width % patch:
            raise ValueError(f"image is {height}x{width}; forward_intermediates needs H and W divisible by patch_size={patch}")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: expected 'NCHW' or 'NLC'")
        if norm and self.encoder.layer_norm is None:
            raise ValueError("norm=True but this backbone has no final LayerNorm (normalize_output=False)")
        depth = self.num_layers
        if indices is None:
            taps = list(range(depth))
        elif isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices={indices}: the last n blocks needs 1 <= n <= depth={depth}")
            taps = list(range(depth - indices, depth))
        else:
            taps = sorted({i % depth if -depth <= i < depth else _bad_index(i, depth) for i in indices})
        grid = (height // patch, width // patch)
        embed = self.vision_embed
        x = embed.proj(image).flatten(2).transpose(1, 2)
        x = torch.cat([embed.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.vision_positions(grid).to(x.dtype)
        last = taps[-1] if stop_early else depth - 1
        final_norm = self.encoder.layer_norm["A"] if self.encoder.layer_norm is not None else nn.Identity()
        maps = []
        for index, layer in enumerate(self.encoder.layers[: last + 1]):
            window = self.config.window_size if self.is_window_block(index) else 0
            x = self._run_vision_block(layer, x, grid, window)
            if index in taps:
                out = final_norm(x) if norm else x
                spatial = out[:, 1:]
                if output_fmt == "NCHW":
                    spatial = spatial.transpose(1, 2).reshape(x.shape[0], -1, *grid)
                maps.append((spatial, out[:, :1]) if return_prefix_tokens else spatial)
        if intermediates_only:
            return maps
        return final_norm(x), maps

    def _run_vision_block(self, layer: nn.Module, x: Tensor, grid: tuple[int, int], window: int) -> Tensor:
        """One block on vision tokens (B, 1+h*w, D), globally or within windows, checkpointed when configured."""
        batch, mask = x.shape[0], None
        if window:
            x, mask = window_partition(x, grid, window)
        x = run_block(layer, self.recompute_policy, [x], ["A"], mask, False, None)[0]
        return window_unpartition(x, batch, grid, window) if window else x


def image_to_text_mask(num_vision: int, num_text: int, device: torch.device | None = None) -> Tensor:
    """The captioning (seq2seq) mask, (I+T, I+T) bool, True = may attend.

    Image attends to image only; text attends to all image tokens and causally to text (diagonal included).
    """
    total = num_vision + num_text
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    allowed[:num_vision, :num_vision] = True
    allowed[num_vision:, :num_vision] = True
    allowed[num_vision:, num_vision:] = torch.ones(num_text, num_text, dtype=torch.bool, device=device).tril()
    return allowed


def interpolate_vision_positions(table: Tensor, num_patches: int) -> Tensor:
    """Resize a vision position table (``POSITION_OFFSET`` + CLS + grid rows) to ``num_patches`` grid cells.

    The first 3 rows (fairseq offset rows and CLS) are kept; the square grid is resized bicubically
    (``align_corners=False``), as the official loader does. (R, D) -> (3 + num_patches, D).
    """
    extra = POSITION_OFFSET + 1
    old = table.shape[0] - extra
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side**2 != old or new_side**2 != num_patches:
        raise ValueError(f"vision position table of {table.shape[0]} rows is not 3 + a square grid")
    if old == num_patches:
        return table
    grid = table[extra:].float().reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(num_patches, -1).to(table.dtype)
    return torch.cat([table[:extra], grid], dim=0)


def _bad_index(index: int, depth: int) -> int:
    raise ValueError(f"block index {index} is out of range for depth={depth} (valid: {-depth} .. {depth - 1})")


def window_partition(x: Tensor, grid: tuple[int, int], window: int) -> tuple[Tensor, Tensor | None]:
    """Split vision tokens into windows for window attention (ViTDet), with CLS first in each window.

    x: (B, 1 + h*w, D), CLS then the (h, w) patch grid row-major. The grid is zero-padded at the bottom/right to
    a multiple of ``window``. Returns tokens (B * nW, 1 + window^2, D), windows in row-major order per image, and
    a key mask (B * nW, 1, 1, 1 + window^2), True = real token, or None when nothing is padded.
    """
    batch, _, dim = x.shape
    h, w = grid
    pad_h, pad_w = (-h) % window, (-w) % window
    patches = x[:, 1:].reshape(batch, h, w, dim)
    if pad_h or pad_w:
        patches = F.pad(patches, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (h + pad_h) // window, (w + pad_w) // window
    windows = patches.view(batch, rows, window, cols, window, dim).permute(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(batch * rows * cols, window * window, dim)
    tokens = torch.cat([x[:, :1].repeat_interleave(rows * cols, dim=0), windows], dim=1)
    if not (pad_h or pad_w):
        return tokens, None
    real = torch.zeros(h + pad_h, w + pad_w, dtype=torch.bool, device=x.device)
    real[:h, :w] = True
    real = real.view(rows, window, cols, window).permute(0, 2, 1, 3).reshape(rows * cols, window * window)
    real = F.pad(real, (1, 0), value=True).repeat(batch, 1)
    return tokens, real[:, None, None, :]


def window_unpartition(tokens: Tensor, batch: int, grid: tuple[int, int], window: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, 1 + window^2, D) -> (B, 1 + h*w, D); CLS = mean over windows."""
    h, w = grid
    rows, cols = -(-h // window), -(-w // window)
    dim = tokens.shape[-1]
    cls = tokens[:, :1].reshape(batch, rows * cols, 1, dim).mean(dim=1)
    patches = tokens[:, 1:].reshape(batch, rows, cols, window, window, dim).permute(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, rows * window, cols * window, dim)[:, :h, :w].reshape(batch, h * w, dim)
    return torch.cat([cls, patches], dim=1)
