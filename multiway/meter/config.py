"""METER configuration: one dataclass per component and a registry of named presets.

A METER model is ``vision encoder + text encoder -> projections -> fusion -> [decoder] -> heads``. Each
piece is a small dataclass; :class:`MeterConfig` holds them all, round-trips through dicts/YAML, and is
stored in every checkpoint so a checkpoint alone rebuilds its model.

The paper's grid axes are fields here: ``fusion.kind`` (``co_attention`` | ``merged_attention``),
``architecture`` (``encoder_only`` | ``encoder_decoder``), ``vision.kind``/``vision.name`` and
``text.kind``/``text.name`` (encoders), and the objective switches in :class:`ObjectiveConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ..config import check_literals, from_dict, read_yaml_mapping, set_dotted, to_dict, to_yaml

VisionKind = Literal["timm", "multiway"]
TextKind = Literal["hf", "embedding"]
FusionKind = Literal["co_attention", "merged_attention"]
Architecture = Literal["encoder_only", "encoder_decoder"]
ImagePooling = Literal["prepend_mean", "fused_mean"]
MimTarget = Literal["pixel", "vqkd"]
VISION_KINDS, TEXT_KINDS, FUSION_KINDS = get_args(VisionKind), get_args(TextKind), get_args(FusionKind)
ARCHITECTURES, IMAGE_POOLINGS = get_args(Architecture), get_args(ImagePooling)


@dataclass
class VisionEncoderConfig:
    """The image encoder.

    ``kind="timm"``: ``name`` is a timm model name (``vit_base_patch16_clip_224``, ``swin_base_patch4_window7_224``
    ...), always built with ``pretrained=False``; ``kwargs`` go to ``timm.create_model`` (``embed_dim``,
    ``depth`` ... for tiny models) and ``weights`` is an optional local file (``.safetensors``/``.pth``/``.bin``)
    loaded afterwards, with the position embedding resampled to ``img_size``.
    ``kind="multiway"``: ``name`` is a multiway preset (``beit3_tiny_patch8_32`` ...); its ``encode_image``
    (vision experts only) is the encoder; ``weights`` is a multiway/official BEiT-3 checkpoint.
    """

    kind: VisionKind = "timm"
    name: str = "vit_base_patch16_clip_224"
    img_size: int = 224
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_literals(self, "vision")


@dataclass
class TextEncoderConfig:
    """The text encoder.

    ``kind="hf"``: a ``transformers`` encoder. ``pretrained`` is a local directory read with
    ``AutoModel.from_pretrained`` (no download: offline only); without it, ``name`` is a model type
    (``bert``, ``roberta`` ...) built from ``AutoConfig.for_model(name, **kwargs)`` with random weights.
    ``kind="embedding"``: the paper's embedding-only baseline: a word-embedding lookup (+ positions), no
    Transformer layers; ``width`` is its size.
    ``vocab_size`` is the tokenizer's id count; T5-style sentinels are appended after it by the model.
    """

    kind: TextKind = "hf"
    name: str = "roberta"
    pretrained: str | None = None
    vocab_size: int = 50265
    width: int = 768
    max_len: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_literals(self, "text")


@dataclass
class FusionConfig:
    """The fusion module. Paper default: co-attention, 6 layers, width 768, 12 heads, FFN 3072."""

    kind: FusionKind = "co_attention"
    depth: int = 6
    width: int = 768
    num_heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    # BERT-style post-LN as in the paper's code; pre-LN is the safer choice for low precision / deep stacks.
    norm_first: bool = False
    # Attention logits/softmax and LayerNorm in fp32 under autocast (what bf16 training needed).
    fp32_attention: bool = True
    # LayerNorm epsilon of the fusion layers, poolers' neighbours and the MLM head (BERT, METER's code: 1e-12).
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_literals(self, "fusion")
        if self.width % self.num_heads:
            raise ValueError(
                f"fusion.width={self.width} is not divisible by fusion.num_heads={self.num_heads}; "
                f"choose a width that is a multiple of the head count"
            )
        if self.depth < 1:
            raise ValueError(f"fusion.depth must be >= 1, got {self.depth}")


@dataclass
class DecoderConfig:
    """The encoder-decoder architecture's Transformer decoder (causal self-attention + cross-attention)."""

    depth: int = 6
    num_heads: int = 12
    ffn_dim: int = 3072
    max_len: int = 64
    num_sentinels: int = 32  # T5 span-corruption sentinel ids, appended after the tokenizer's vocabulary


@dataclass
class ObjectiveConfig:
    """Pre-training objectives, each switchable; the total loss is ``sum(weight * loss)``.

    For the encoder-decoder architecture ``mlm`` means T5-style span corruption (the decoder reconstructs
    the corrupted spans), as in the paper.
    """

    mlm: bool = True
    itm: bool = True
    mim: bool = False
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    mim_weight: float = 1.0
    mlm_probability: float = 0.15
    whole_word_masking: bool = False
    span_length: float = 3.0  # mean span length of span corruption
    itm_hard_negatives: bool = False  # sample ITM negatives from in-batch ITC similarities (adds the ITC loss)
    itc_weight: float = 1.0
    mim_ratio: float = 0.4
    mim_target: MimTarget = "pixel"  # "pixel" (masked-patch regression) | "vqkd" (visual tokens from a VQ-KD tokenizer)
    vqkd_tokenizer: str | None = None  # local VQ-KD checkpoint for mim_target="vqkd"

    def __post_init__(self) -> None:
        check_literals(self, "objectives")

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(n for n in ("mlm", "itm", "mim") if getattr(self, n))


@dataclass
class OptimConfig:
    """The paper's best optimisation: AdamW, lower lr for pretrained encoders, higher for new layers/heads."""

    lr: float = 1e-5  # pretrained encoders ("bottom")
    lr_mult_top: float = 5.0  # projections + fusion (+ decoder): 5e-5 in the paper
    lr_mult_head: float = 5.0  # task heads: x5 for pre-training, x10-50 in the releases' fine-tuning
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6


@dataclass
class MeterConfig:
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    architecture: Architecture = "encoder_only"
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Dual-encoder projections (itc_text, itc_image, logit_scale): retrieval candidates and hard ITM negatives.
    # METER's released checkpoints have none; models converted from them set this to False.
    dual_encoder: bool = True
    # Image encoders without a CLS token (Swin): "prepend_mean" puts the mean of the encoder's tokens in front of
    # the grid before fusion; "fused_mean" (METER's code) fuses the grid alone and pools the mean of the fused
    # image tokens.
    image_pooling: ImagePooling = "prepend_mean"
    # std of the normal init of every new layer (projections, fusion, decoder, heads). METER's 0.02 (BERT's) is
    # tuned for width 768: each such linear layer has a gain of 0.02·√width, 0.55 there but 0.11 at width 32,
    # where two post-LN fusion layers then mix in ~1% of the other modality at init. ``tiny_config`` keeps
    # METER's gain instead: 0.02·√(768 / fusion.width).
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_dict(cls, value, name))
        check_literals(self)
        if not self.init_std > 0:
            raise ValueError(f"init_std={self.init_std!r}: expected a positive std for the new layers' normal init")
        if self.fusion.width % self.decoder.num_heads:
            raise ValueError(
                f"fusion.width={self.fusion.width} is not divisible by decoder.num_heads={self.decoder.num_heads}; "
                "the decoder runs at the fusion width"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeterConfig:
        return from_dict(cls, d)

    def replace(self, **overrides: Any) -> MeterConfig:
        """Copy with overrides; nested fields by dotted name: ``replace(**{"fusion.kind": "merged_attention"})``."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_dotted(d, key, value)
        return MeterConfig.from_dict(d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(to_yaml(self))

    @classmethod
    def load(cls, path: str | Path) -> MeterConfig:
        data = read_yaml_mapping(path)
        return cls.from_dict(data.get("model", data))


_SECTIONS = {
    "vision": VisionEncoderConfig,
    "text": TextEncoderConfig,
    "fusion": FusionConfig,
    "decoder": DecoderConfig,
    "objectives": ObjectiveConfig,
    "optim": OptimConfig,
}


# --- presets ------------------------------------------------------------------------------------------------

# Tiny components for tests, the CPU study and demos. 32 px images (as the built-in data), width 32 fusion.
TINY_VISION = {
    "vit": VisionEncoderConfig(
        "timm", "vit_base_patch16_clip_224", img_size=32, kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    ),
    "swin": VisionEncoderConfig(
        "timm",
        "swin_base_patch4_window7_224",
        img_size=32,
        kwargs=dict(patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4),
    ),
    "multiway": VisionEncoderConfig(
        "multiway", "beit3_tiny_patch8_32", img_size=32, kwargs=dict(depth=2, embed_dim=32, num_heads=2, ffn_dim=64)
    ),
}
TINY_TEXT = {
    "bert": TextEncoderConfig(
        "hf", "bert", vocab_size=1000, width=32, max_len=32,
        kwargs=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    ),
    "roberta": TextEncoderConfig(
        "hf", "roberta", vocab_size=1000, width=32, max_len=32,
        kwargs=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    ),
    "embedding": TextEncoderConfig("embedding", "embedding", vocab_size=1000, width=32, max_len=32),
}
TINY_FUSION = dict(depth=2, width=32, num_heads=2, ffn_dim=64, dropout=0.0)
TINY_DECODER = DecoderConfig(depth=1, num_heads=2, ffn_dim=64, max_len=32, num_sentinels=8)


def tiny_config(
    vision: str = "vit", text: str = "bert", fusion: str = "co_attention", architecture: str = "encoder_only", width: int = 32,
    **objectives: Any,
) -> MeterConfig:
    """A tiny METER over the named tiny encoders; ``objectives`` override :class:`ObjectiveConfig`.

    ``width`` (a multiple of 4) sets the encoders' and the fusion's width, FFNs at twice it (Swin's first stage at half
    of it), and the new layers' init std (:func:`width_scaled_init_std`)."""
    if vision not in TINY_VISION:
        raise ValueError(f"vision={vision!r} is not a tiny vision encoder; accepted values: {sorted(TINY_VISION)}")
    if text not in TINY_TEXT:
        raise ValueError(f"text={text!r} is not a tiny text encoder; accepted values: {sorted(TINY_TEXT)}")
    if width < 4 or width % 4:
        raise ValueError(f"width={width}: expected a multiple of 4 (2 heads, and Swin's first stage at half the width)")
    return MeterConfig(
        vision=tiny_vision(vision, width),
        text=tiny_text(text, width),
        fusion=FusionConfig(kind=fusion, **{**TINY_FUSION, "width": width, "ffn_dim": 2 * width}),
        architecture=architecture,
        decoder=dataclasses.replace(TINY_DECODER, ffn_dim=2 * width),
        objectives=ObjectiveConfig(**objectives),
        init_std=width_scaled_init_std(width),
    )


def tiny_vision(name: str, width: int = 32) -> VisionEncoderConfig:
    """The tiny vision encoder ``name`` (:data:`TINY_VISION`) at ``width``."""
    kwargs = dict(TINY_VISION[name].kwargs)
    kwargs["embed_dim"] = width // 2 if name == "swin" else width
    if "ffn_dim" in kwargs:
        kwargs["ffn_dim"] = 2 * width
    return dataclasses.replace(TINY_VISION[name], kwargs=kwargs)


def tiny_text(name: str, width: int = 32) -> TextEncoderConfig:
    """The tiny text encoder ``name`` (:data:`TINY_TEXT`) at ``width``."""
    kwargs = dict(TINY_TEXT[name].kwargs)
    if "hidden_size" in kwargs:
        kwargs.update(hidden_size=width, intermediate_size=2 * width)
    return dataclasses.replace(TINY_TEXT[name], width=width, kwargs=kwargs)


def width_scaled_init_std(width: int, reference_width: int = 768, reference_std: float = 0.02) -> float:
    """The init std that gives a ``width``-wide linear layer the gain METER's 0.02 gives at width 768."""
    return reference_std * math.sqrt(reference_width / width)


def _paper(vision: VisionEncoderConfig, text_name: str = "roberta", vocab: int = 50265, **kw: Any) -> MeterConfig:
    return MeterConfig(vision=vision, text=TextEncoderConfig("hf", text_name, vocab_size=vocab, width=768, max_len=50), **kw)


# The paper's configurations (weights come from local files: set vision.weights / text.pretrained).
PRESETS: dict[str, MeterConfig] = {
    "meter_clip16_roberta_coattn": _paper(VisionEncoderConfig("timm", "vit_base_patch16_clip_224", img_size=288)),
    "meter_clip16_roberta_merged": _paper(
        VisionEncoderConfig("timm", "vit_base_patch16_clip_224", img_size=288), fusion=FusionConfig(kind="merged_attention")
    ),
    "meter_clip16_roberta_coattn_encdec": _paper(
        VisionEncoderConfig("timm", "vit_base_patch16_clip_224", img_size=288), architecture="encoder_decoder"
    ),
    "meter_swin_roberta_coattn": _paper(VisionEncoderConfig("timm", "swin_base_patch4_window12_384", img_size=384)),
    "meter_clip16_bert_coattn": _paper(VisionEncoderConfig("timm", "vit_base_patch16_clip_224", img_size=288), "bert", 30522),
    "meter_tiny_vit_bert_coattn": tiny_config("vit", "bert", "co_attention"),
    "meter_tiny_vit_bert_merged": tiny_config("vit", "bert", "merged_attention"),
    "meter_tiny_vit_bert_coattn_encdec": tiny_config("vit", "bert", "co_attention", "encoder_decoder"),
    "meter_tiny_swin_roberta_coattn": tiny_config("swin", "roberta", "co_attention"),
    "meter_tiny_multiway_embedding_coattn": tiny_config("multiway", "embedding", "co_attention"),
}


def get_meter_config(name: str, **overrides: Any) -> MeterConfig:
    """The preset ``name`` with dotted-name overrides (``**{"fusion.depth": 2}``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown METER preset {name!r}; accepted values: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name].replace()
