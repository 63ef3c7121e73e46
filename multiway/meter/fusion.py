"""METER's fusion modules: co-attention and merged attention, plus the Transformer layer they share.

Masks everywhere are boolean with True = may attend (``F.scaled_dot_product_attention`` convention);
padding masks are (B, L) with True/nonzero = padding.

Low precision: with ``fp32_attention`` the attention logits/softmax run in fp32 (q, k, v are upcast before
SDPA) and every LayerNorm normalises in fp32, whatever autocast says. Padded keys are never the only keys
of a row (token 0 of each modality is real), so no softmax row is all ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FusionConfig


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (bf16-safe)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def key_mask(padding_mask: Tensor | None) -> Tensor | None:
    """(B, L) padding (nonzero = pad) -> (B, 1, 1, L) bool, True = may attend."""
    if padding_mask is None:
        return None
    return (~padding_mask.bool())[:, None, None, :]


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention through SDPA. x: (B, Lq, D), context: (B, Lk, D) -> (B, Lq, D)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, fp32: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.fp32 = fp32

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values of ``context`` (B, Lk, D): two (B, heads, Lk, D/heads) tensors (what a cache holds)."""
        B, Lk, _ = context.shape
        k = self.k(context).view(B, Lk, self.num_heads, -1).transpose(1, 2)
        v = self.v(context).view(B, Lk, self.num_heads, -1).transpose(1, 2)
        return k, v

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None, causal: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``kv`` (from :meth:`keys_values`, possibly cached) replaces projecting ``context``."""
        B, Lq, D = x.shape
        h = self.num_heads
        q = self.q(x).view(B, Lq, h, -1).transpose(1, 2)
        k, v = kv if kv is not None else self.keys_values(x if context is None else context)
        dtype = q.dtype
        if causal:
            tri = torch.ones(Lq, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - Lq)
            mask = tri if mask is None else mask & tri
        p = self.dropout if self.training else 0.0
        if self.fp32 and dtype != torch.float32:
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=p)
            out = out.to(dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(B, Lq, D))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))


class FusionLayer(nn.Module):
    """Self-attention, optional cross-attention to a context, FFN; post-LN (BERT, the paper's code) or pre-LN.

    Used as a co-attention layer (``cross=True``), a merged-attention layer (``cross=False``) and a decoder
    layer (``cross=True``, ``causal=True``).
    """

    def __init__(
        self, dim: int, num_heads: int, ffn_dim: int, cross: bool, dropout: float = 0.0, norm_first: bool = False, fp32: bool = True,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = Attention(dim, num_heads, dropout, fp32)
        self.norm1 = LayerNorm32(dim, eps=eps)
        self.cross_attn = Attention(dim, num_heads, dropout, fp32) if cross else None
        self.norm2 = LayerNorm32(dim, eps=eps) if cross else None
        self.norm_context = LayerNorm32(dim, eps=eps) if cross and norm_first else None
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm3 = LayerNorm32(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        """x (B, L, D); context (B, Lc, D); masks bool broadcastable to (B, 1, L, L|Lc), True = attend."""
        if self.norm_first:
            x = x + self.drop(self.self_attn(self.norm1(x), mask=self_mask, causal=causal))
            if self.cross_attn is not None:
                x = x + self.drop(self.cross_attn(self.norm2(x), self.norm_context(context), mask=context_mask))
            return x + self.ffn(self.norm3(x))
        x = self.norm1(x + self.drop(self.self_attn(x, mask=self_mask, causal=causal)))
        if self.cross_attn is not None:
            x = self.norm2(x + self.drop(self.cross_attn(x, context, mask=context_mask)))
        return self.norm3(x + self.ffn(x))


    def step(self, x: Tensor, cache: dict[str, Tensor], context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """One incremental decoder step: x (B, 1, D), the new position only; ``cache`` holds this layer's self-attention
        keys/values of the earlier positions (``"k"``, ``"v"``) and the context's (``"ck"``, ``"cv"``; filled on the first
        call) and is updated in place. Equals :meth:`forward` with ``causal=True`` on the whole prefix, last row."""
        if "ck" not in cache:
            ctx = self.norm_context(context) if self.norm_first else context
            cache["ck"], cache["cv"] = self.cross_attn.keys_values(ctx)
        h = self.norm1(x) if self.norm_first else x
        k, v = self.self_attn.keys_values(h)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        a = self.drop(self.self_attn(h, kv=(k, v)))
        if self.norm_first:
            x = x + a
            x = x + self.drop(self.cross_attn(self.norm2(x), mask=context_mask, kv=(cache["ck"], cache["cv"])))
            return x + self.ffn(self.norm3(x))
        x = self.norm1(x + a)
        x = self.norm2(x + self.drop(self.cross_attn(x, mask=context_mask, kv=(cache["ck"], cache["cv"]))))
        return self.norm3(x + self.ffn(x))


@dataclass
class FusionOutput:
    """text: (B, T, D) fused text tokens; image: (B, N, D) fused image tokens (token 0 is CLS/pooled)."""

    text: Tensor
    image: Tensor
    text_padding_mask: Tensor | None


class CoAttentionFusion(nn.Module):
    """Two stacks of layers, one per modality; layer i of each attends to layer i-1's output of the other.

    The paper's default (METER-CLIP-ViT/RoBERTa): 6 layers, width 768, 12 heads.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()

        def layer() -> FusionLayer:
            return FusionLayer(
                cfg.width, cfg.num_heads, cfg.ffn_dim, True, cfg.dropout, cfg.norm_first, cfg.fp32_attention, cfg.layer_norm_eps
            )

        self.text_layers = nn.ModuleList(layer() for _ in range(cfg.depth))
        self.image_layers = nn.ModuleList(layer() for _ in range(cfg.depth))
        self.text_norm = LayerNorm32(cfg.width, eps=cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()
        self.image_norm = LayerNorm32(cfg.width, eps=cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()

    def forward(self, text: Tensor, image: Tensor, text_padding_mask: Tensor | None = None) -> FusionOutput:
        """text (B, T, D), image (B, N, D) (type embeddings already added) -> :class:`FusionOutput`."""
        tmask = key_mask(text_padding_mask)
        for t_layer, i_layer in zip(self.text_layers, self.image_layers):
            text, image = t_layer(text, tmask, image, None), i_layer(image, None, text, tmask)
        return FusionOutput(self.text_norm(text), self.image_norm(image), text_padding_mask)


class MergedAttentionFusion(nn.Module):
    """One Transformer stack over the concatenation ``[text; image]`` (modality-type embeddings added before)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            FusionLayer(cfg.width, cfg.num_heads, cfg.ffn_dim, False, cfg.dropout, cfg.norm_first, cfg.fp32_attention, cfg.layer_norm_eps)
            for _ in range(cfg.depth)
        )
        self.norm = LayerNorm32(cfg.width, eps=cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()

    def forward(self, text: Tensor, image: Tensor, text_padding_mask: Tensor | None = None) -> FusionOutput:
        T = text.shape[1]
        x = torch.cat([text, image], dim=1)
        mask = None
        if text_padding_mask is not None:
            pad = F.pad(text_padding_mask.bool(), (0, image.shape[1]), value=False)
            mask = key_mask(pad)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm(x)
        return FusionOutput(x[:, :T], x[:, T:], text_padding_mask)


FUSIONS = {"co_attention": CoAttentionFusion, "merged_attention": MergedAttentionFusion}


def build_fusion(cfg: FusionConfig) -> nn.Module:
    return FUSIONS[cfg.kind](cfg)
