"""Model configuration and the registry of named presets.

One dataclass, :class:`MultiwayConfig`, describes a Multiway Transformer. It is stored inside every
checkpoint we write, so a checkpoint alone rebuilds its model. Named presets follow the official
BEiT-3 names (``beit3_base_patch16_224`` ...) plus the paper's giant model and tiny CPU presets.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from multiway.config import check_literals, from_dict, read_yaml_mapping, to_dict, to_yaml


@dataclass
class MultiwayConfig:
    """Hyper-parameters of a Multiway Transformer backbone.

    The defaults are BEiT-3 base at 224 px as released. Two switches select the architecture:

    * ``shared_attention=False, vl_expert_layers=0`` — the *released* BEiT-3 ("decoupled" Multiway
      Transformer): every sublayer, attention projections included, has a vision expert ``A`` and a
      language expert ``B``. Official checkpoints use this layout.
    * ``shared_attention=True, vl_expert_layers=K`` — the *paper's* design: one self-attention module
      shared by all modalities, per-modality FFN experts, and a third vision-language expert ``C`` in the
      top ``K`` layers that serves every token of a fused (image+text) input (paper: K=3).
    """

    depth: int = 12
    embed_dim: int = 768
    num_heads: int = 12
    ffn_dim: int = 3072
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-5
    # False for the official image-classification and VQA heads (no final encoder LayerNorm).
    normalize_output: bool = True
    shared_attention: bool = False
    vl_expert_layers: int = 0
    grad_checkpointing: bool = False
    # Recompute the LayerNorms, sub-LayerNorms and GELU of each block in backward instead of keeping their outputs
    # (selective activation checkpointing; the matmuls are not rerun): about half a block's activation memory,
    # same outputs and gradients. See multiway/model/recompute.py.
    recompute_norms: bool = True
    # Std of the position tables at init (only matters when training from scratch). The official code leaves them
    # at nn.Embedding's N(0, 1), which at small widths drowns the token and patch embeddings (std ~D^-1/2 and
    # ~0.04): a from-scratch tiny model then sees mostly positions and its [CLS] barely depends on the input.
    # 0.02 is the ViT/BEiT choice; None keeps the official N(0, 1).
    position_init_std: float | None = 0.02
    # Init of the task heads (pooler, MLPs, projections, LM heads) when they are not loaded: "official" =
    # trunc_normal(0.02) clipped at +-0.02 whatever the width; "fan_in" = PyTorch's default Linear init, std
    # (3 fan_in)^-1/2, which equals ~0.02 at width 768 but is 3.6x larger at width 64. At small widths the
    # official init leaves stacked heads (VQA: pooler + 2-layer MLP) stuck at chance: a width-64 fused model
    # learned the colour of a single shape to 98% with "fan_in" and stayed at 12.5% (chance) with "official".
    head_init: Literal["official", "fan_in"] = "official"
    # Std of the backbone's Linear weights at init, cut at +-std as the official code does. 0.02 (official) suits
    # width ~768; at width 64 it makes every projection shrink its input ~12x, attention stays uniform and a
    # from-scratch fused model learned to answer from the question alone (VQA score with real images within 2
    # points of shuffled ones). The tiny and small presets use D^-1/2.
    init_std: float = 0.02
    # ViTDet window attention on the dense path (``forward_intermediates``): patch tokens attend within
    # non-overlapping windows of ``window_size`` x ``window_size`` patches (0 = global attention everywhere), and
    # every ``global_attention_interval``-th block stays global (ViTDet: base 3 -> blocks 2, 5, 8, 11; large 6).
    window_size: int = 0
    global_attention_interval: int = 0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
        if not 0 <= self.vl_expert_layers <= self.depth:
            raise ValueError(f"vl_expert_layers={self.vl_expert_layers} must lie in [0, depth={self.depth}]")
        check_literals(self)
        if not self.init_std > 0:
            raise ValueError(f"init_std={self.init_std!r}: expected a positive std")
        if self.window_size < 0 or self.global_attention_interval < 0:
            raise ValueError(
                f"window_size={self.window_size} and global_attention_interval={self.global_attention_interval} must be >= 0"
            )
        if self.max_text_positions < 3:
            raise ValueError("max_text_positions must be >= 3 (rows 0-1 are the fairseq offset)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_vision_tokens(self) -> int:
        """CLS + patches."""
        return self.num_patches + 1

    def replace(self, **overrides: Any) -> MultiwayConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown config field(s) {sorted(unknown)}; valid fields: {sorted(self.to_dict())}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultiwayConfig:
        """Build from a mapping of fields (checked and coerced by :func:`multiway.config.from_dict`)."""
        return from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> MultiwayConfig:
        return cls.from_dict(json.loads(s))

    def save(self, path: str | Path) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        path.write_text(to_yaml(self) if path.suffix in (".yaml", ".yml") else self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> MultiwayConfig:
        """Read a YAML or JSON file of fields (YAML is a superset of JSON)."""
        try:
            return cls.from_dict(read_yaml_mapping(path))
        except ValueError as e:
            raise type(e)(f"{path}: {e}") from None


_BASE = dict(depth=12, embed_dim=768, num_heads=12, ffn_dim=3072, patch_size=16)
_LARGE = dict(depth=24, embed_dim=1024, num_heads=16, ffn_dim=4096, patch_size=16)
_GIANT = dict(depth=40, embed_dim=1408, num_heads=16, ffn_dim=6144, patch_size=14, shared_attention=True, vl_expert_layers=3)
# Tiny presets: the golden-fixture shape (depth 2, width 64), for tests and CPU demos. Their Linear init std is
# D^-1/2 (see MultiwayConfig.init_std): with it the quickstart's pretraining taught the fused model to read colours
# from the image; with 0.02 it learned the captions' language only.
_TINY = dict(depth=2, embed_dim=64, num_heads=4, ffn_dim=256, patch_size=8, vocab_size=1000, max_text_positions=64,
             head_init="fan_in", init_std=64**-0.5)
_SMALL = dict(depth=4, embed_dim=128, num_heads=4, ffn_dim=512, patch_size=8, max_text_positions=128, head_init="fan_in",
              init_std=128**-0.5)

PRESETS: dict[str, MultiwayConfig] = {
    **{f"beit3_base_patch16_{s}": MultiwayConfig(img_size=s, **_BASE) for s in (224, 384, 480)},
    **{f"beit3_large_patch16_{s}": MultiwayConfig(img_size=s, **_LARGE) for s in (224, 384, 480, 768)},
    "beit3_giant_patch14_224": MultiwayConfig(img_size=224, **_GIANT),
    "beit3_tiny_patch8_32": MultiwayConfig(img_size=32, **_TINY),
    "beit3_tiny_patch8_32_paper": MultiwayConfig(img_size=32, shared_attention=True, vl_expert_layers=1, **_TINY),
    "beit3_small_patch8_64": MultiwayConfig(img_size=64, vocab_size=4000, **_SMALL),
}


def get_config(name: str, **overrides: Any) -> MultiwayConfig:
    """The preset ``name`` with config fields overridden by keyword."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
