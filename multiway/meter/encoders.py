"""METER's unimodal encoders: vision through timm or multiway, text through ``transformers`` or an embedding table.

Nothing here downloads: timm models are always built with ``pretrained=False`` and then optionally loaded
from a local file; ``transformers`` models come from a local directory (``local_files_only=True``) or from a
config with random weights.

Every encoder maps its input to a token sequence:

* :class:`VisionEncoder`: image (B, 3, H, W) -> (B, P + N, D_v), ``P = num_prefix_tokens`` (CLS) then an
  ``grid x grid`` patch/window grid in raster order.
* :class:`TextEncoder`: ids (B, T) + padding mask (B, T) -> (B, T, D_t); token 0 is ``<s>``/``[CLS]``.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import TextEncoderConfig, VisionEncoderConfig

# transformers model types accepted for a randomly initialised text encoder (any local directory is accepted).
TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "albert", "camembert", "mpnet")


def read_state_dict(path: str | os.PathLike, option: str) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` / ``.pth`` / ``.bin`` / ``.pt`` file (nested under
    ``model``/``state_dict``/``module`` keys is fine). ``option`` names the config field for errors."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{option}={str(path)!r}: no such local weights file (METER never downloads weights)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{option}={str(path)!r}: expected a state dict, got {type(state).__name__}")
    return state


class VisionEncoder(nn.Module):
    """An image encoder with a token-sequence output, a known patch grid and a known prefix length.

    Attributes:
        width: D_v. num_prefix_tokens: CLS-like tokens before the grid (0 for Swin).
        grid: side of the output grid; ``reduction = img_size // grid`` pixels per output token side.
    """

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.config = cfg
        self.kind = cfg.kind
        if cfg.kind == "timm":
            self.model, self.width, self.num_prefix_tokens, self.reduction = _build_timm(cfg)
        else:
            self.model, self.width, self.num_prefix_tokens, self.reduction = _build_multiway(cfg)
        if cfg.img_size % self.reduction:
            raise ValueError(f"vision.img_size={cfg.img_size} is not a multiple of the encoder's stride {self.reduction}")
        self.img_size = cfg.img_size
        self.grid = cfg.img_size // self.reduction

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid**2

    def forward(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, P + grid², D_v)."""
        if self.kind == "multiway":
            return self.model.encode_image(image)
        x = self.model.forward_features(image)
        if x.dim() == 4:  # Swin and other hierarchical models: (B, h, w, C) channels-last
            x = x.flatten(1, 2)
        return x


def _build_timm(cfg: VisionEncoderConfig) -> tuple[nn.Module, int, int, int]:
    import timm

    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=8, cutoff=0.5)
        raise ValueError(
            f"vision.name={cfg.name!r} is not a timm model; accepted values: any name from timm.list_models() "
            f"(ViT/CLIP-ViT such as 'vit_base_patch16_clip_224', Swin such as 'swin_base_patch4_window7_224')"
            + (f"; closest: {close}" if close else "")
        )
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("img_size", cfg.img_size)
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise ValueError(f"vision.kwargs={cfg.kwargs} are not accepted by timm model {cfg.name!r}: {e}") from e
    if cfg.weights:
        load_timm_weights(model, cfg.weights)
    width = model.num_features
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    reduction = int(model.feature_info[-1]["reduction"])
    return model, width, prefix, reduction


def load_timm_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local timm/original-format checkpoint into a timm model.

    The model module's own ``checkpoint_filter_fn`` converts original layouts (OpenAI CLIP, Swin) and
    resamples absolute position embeddings (``timm.layers.resample_abs_pos_embed``) and Swin's relative
    position tables to the model's resolution. Classifier-head tensors are dropped (METER uses features).
    """
    state = read_state_dict(path, "vision.weights")
    module = sys.modules[type(model).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    if "pos_embed" in state and hasattr(model, "pos_embed") and state["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=grid, num_prefix_tokens=prefix)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in own}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise ValueError(
            f"vision.weights={str(path)!r} does not fit {type(model).__name__}: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )


def _build_multiway(cfg: VisionEncoderConfig) -> tuple[nn.Module, int, int, int]:
    from ..model import create_model, load_checkpoint
    from ..model.config import PRESETS as MULTIWAY_PRESETS

    if cfg.name not in MULTIWAY_PRESETS:
        raise ValueError(f"vision.name={cfg.name!r} is not a multiway preset; accepted values: {sorted(MULTIWAY_PRESETS)}")
    model = create_model(cfg.name, img_size=cfg.img_size, **cfg.kwargs)
    if cfg.weights:
        if not Path(cfg.weights).is_file():
            raise FileNotFoundError(f"vision.weights={cfg.weights!r}: no such local weights file (METER never downloads weights)")
        load_checkpoint(model, cfg.weights, strict=False)
    return model, model.config.embed_dim, 1, model.config.patch_size


class EmbeddingTextEncoder(nn.Module):
    """The paper's embedding-only baseline: word + position embeddings and a LayerNorm, no Transformer."""

    def __init__(self, vocab_size: int, width: int, max_len: int, pad_id: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position = nn.Embedding(max_len, width)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.word.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.norm(self.word(ids) + self.position(pos))


class TextEncoder(nn.Module):
    """A text encoder with a token-sequence output. ``vocab_size`` = tokenizer ids + ``extra_tokens`` (sentinels)."""

    def __init__(self, cfg: TextEncoderConfig, extra_tokens: int = 0, pad_id: int = 1):
        super().__init__()
        self.config = cfg
        self.kind = cfg.kind
        self.vocab_size = cfg.vocab_size + extra_tokens
        if cfg.kind == "embedding":
            self.model: nn.Module = EmbeddingTextEncoder(self.vocab_size, cfg.width, cfg.max_len, pad_id)
            self.width = cfg.width
        else:
            self.model = _build_hf(cfg, self.vocab_size, pad_id)
            self.width = int(self.model.config.hidden_size)

    @property
    def word_embeddings(self) -> nn.Embedding:
        if self.kind == "embedding":
            return self.model.word
        return self.model.get_input_embeddings()

    def forward(self, ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """ids (B, T), padding_mask (B, T) nonzero = pad -> (B, T, D_t)."""
        if self.kind == "embedding":
            return self.model(ids)
        attention_mask = None if padding_mask is None else (~padding_mask.bool()).long()
        return self.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state


def _build_hf(cfg: TextEncoderConfig, vocab_size: int, pad_id: int) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text.pretrained={cfg.pretrained!r}: not a local transformers model directory (needs config.json and "
                "weights; METER never downloads). Save one with model.save_pretrained(dir), or unset text.pretrained "
                "for a random-init encoder"
            )
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the pooler we never use is "missing": not worth a warning
        try:
            try:
                model = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
            except TypeError:  # model types without a pooler flag
                model = AutoModel.from_pretrained(str(path), local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
        return model
    if cfg.name not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"text.name={cfg.name!r} is not a supported transformers model type for a random-init text encoder; "
            f"accepted values: {', '.join(TEXT_MODEL_TYPES)} (or set text.pretrained to a local model directory)"
        )
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("vocab_size", vocab_size)
    kwargs.setdefault("pad_token_id", pad_id)
    # RoBERTa-style models offset positions by pad_id + 1
    kwargs.setdefault("max_position_embeddings", cfg.max_len + pad_id + 2)
    config = AutoConfig.for_model(cfg.name, **kwargs)
    if hasattr(config, "add_pooling_layer"):
        config.add_pooling_layer = False
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)

