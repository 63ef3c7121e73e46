"""METER's released checkpoints (Lightning ``.ckpt``) and our own METER files (safetensors, config embedded).

METER's official ``state_dict`` layout and where each part lands in :mod:`multiway.meter`:

==============================================  ====================================================================
official key                                    multiway (under the task wrapper)
==============================================  ====================================================================
``vit_model.visual.*`` (OpenAI CLIP-ViT)        ``meter.vision.model.*`` (timm ViT, converted by timm's own filter)
``vit_model.*`` (Swin, original layout)         ``meter.vision.model.*`` (timm Swin, converted by timm's own filter)
``text_transformer.*`` (HF BERT/RoBERTa)        ``meter.text.model.*`` (same HF layout; the unused pooler is dropped)
``cross_modal_{text,image}_transform``          ``meter.{text,image}_proj``
``token_type_embeddings`` (2 or 3 rows)         ``meter.type_embed`` (3 rows; row 2 := row 1 as METER's NLVR2 init)
``cross_modal_{text,image}_layers.N.``          ``meter.fusion.{text,image}_layers.N.``: ``attention.self.{query,key,
                                                value}`` -> ``self_attn.{q,k,v}``, ``attention.output.dense`` ->
                                                ``self_attn.proj``, ``attention.output.LayerNorm`` -> ``norm1``,
                                                ``crossattention.*`` -> ``cross_attn.*`` / ``norm2``,
                                                ``intermediate.dense`` -> ``ffn.0``, ``output.dense`` -> ``ffn.2``,
                                                ``output.LayerNorm`` -> ``norm3``
``cross_modal_{text,image}_pooler.dense``       ``meter.{text,image}_pooler.0``
``mlm_score``, ``itm_score``                    :class:`METERForPretraining` ``mlm_head``, ``itm_head``
``vqa_classifier`` / ``snli_classifier``        :class:`METERForVQA` / :class:`METERForSNLIVE` ``head``
``nlvr2_classifier``                            :class:`METERForNLVR2` ``head``
``rank_output``                                 :class:`METERForRetrieval` ``rank_head``
==============================================  ====================================================================

Position tables are adapted to a new resolution the way METER does it (:func:`adapt_position_encoding`,
:func:`swin_adapt_position_encoding`: bicubic, no antialiasing). Lightning files are read with
``torch.load(weights_only=True)``: tensors come out of ``state_dict``, plain values out of
``hyper_parameters``; no code runs and Lightning is not needed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..model.checkpoints import CheckpointError, LoadReport, _atomic_write, _short, extras_metadata, raise_unfit
from .config import DecoderConfig, FusionConfig, MeterConfig, TextEncoderConfig, VisionEncoderConfig
from .model import METERForNLVR2, METERForPretraining, METERForRetrieval, METERForSNLIVE, METERForVQA, METERModel, _Wrapper

logger = logging.getLogger(__name__)

#: Task name -> wrapper class (the names of ``multiway meter convert --task``).
OFFICIAL_TASKS: dict[str, type[_Wrapper]] = {
    "pretraining": METERForPretraining,
    "vqa": METERForVQA,
    "nlvr2": METERForNLVR2,
    "snli_ve": METERForSNLIVE,
    "retrieval": METERForRetrieval,
}
_ALL_HEAD_PREFIXES = tuple(sorted({p for cls in OFFICIAL_TASKS.values() for p in cls.official_heads} | {"itm_score."}))
# In METER's checkpoints but never used by its forward pass: the HF text pooler (METER pools the fused tokens), and
# the position/type id buffers that older transformers versions saved (the model rebuilds them).
_UNUSED_PREFIXES = ("text_transformer.pooler.", "text_transformer.embeddings.position_ids", "text_transformer.embeddings.token_type_ids")
_LAYER_PARTS = [
    ("attention.self.query.", "self_attn.q."),
    ("attention.self.key.", "self_attn.k."),
    ("attention.self.value.", "self_attn.v."),
    ("attention.output.dense.", "self_attn.proj."),
    ("attention.output.LayerNorm.", "norm1."),
    ("crossattention.self.query.", "cross_attn.q."),
    ("crossattention.self.key.", "cross_attn.k."),
    ("crossattention.self.value.", "cross_attn.v."),
    ("crossattention.output.dense.", "cross_attn.proj."),
    ("crossattention.output.LayerNorm.", "norm2."),
    ("intermediate.dense.", "ffn.0."),
    ("output.dense.", "ffn.2."),
    ("output.LayerNorm.", "norm3."),
]
_MLM_PARTS = [
    ("transform.dense.", "transform.0."), ("transform.LayerNorm.", "transform.2."), ("decoder.", "decoder."), ("bias", "decoder.bias"),
]
_CROSS_LAYER = re.compile(r"cross_modal_(text|image)_layers\.(\d+)\.(.+)")


# --- reading ----------------------------------------------------------------------------------------------


def read_official(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and METER's hyper-parameter config from a Lightning ``.ckpt`` (``{"state_dict": ..., "hyper_parameters":
    {"config": ...}}``), or from a plain state dict file. Returns ``(state, config)``; ``config`` is ``{}`` when absent."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"METER checkpoint not found: {p}")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{p}: refused to load — the pickle holds objects other than tensors and plain containers, and loading it "
            f"would execute code ({str(e).splitlines()[0]}). Only weights-only checkpoints are read."
        ) from e
    except Exception as e:  # the unpickler raises many types on garbage
        raise CheckpointError(f"{p}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    hparams: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        hp = obj.get("hyper_parameters") or {}
        hparams = dict(hp.get("config", hp)) if isinstance(hp, Mapping) else {}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: expected a Lightning checkpoint with a 'state_dict' of tensors, or a dict of tensors")
    return dict(obj), hparams


# --- position tables (METER's own adaptation) ---------------------------------------------------------------


def adapt_position_encoding(
    state: dict[str, Tensor], after: int, patch_size: int, suffix: str = "visual.positional_embedding"
) -> dict[str, Tensor]:
    """Resize the CLIP-ViT position table ending in ``suffix`` to an ``after`` px image, as METER does.

    The class-token row is kept; the ``g x g`` grid rows are resized bicubically (no antialiasing, corners not
    aligned) to ``(after // patch_size)²``. Works on (1 + g², D) and (1, 1 + g², D) tables. Returns ``state``
    (modified in place).
    """
    keys = [k for k in state if k.endswith(suffix)]
    if len(keys) != 1:
        raise CheckpointError(f"expected exactly one key ending in {suffix!r} to adapt, found {keys}")
    if after % patch_size:
        raise ValueError(f"image size {after} is not a multiple of the patch size {patch_size}")
    table = state[keys[0]]
    squeeze = table.dim() == 2
    t = table.unsqueeze(0) if squeeze else table
    grid_before = round((t.shape[1] - 1) ** 0.5)
    if grid_before**2 != t.shape[1] - 1:
        raise CheckpointError(f"{keys[0]}: {t.shape[1] - 1} grid rows do not form a square grid")
    grid_after, dim = after // patch_size, t.shape[-1]
    if grid_after != grid_before:
        grid = t[0, 1:].reshape(grid_before, grid_before, dim).permute(2, 0, 1).unsqueeze(0)
        grid = F.interpolate(grid.float(), size=(grid_after, grid_after), mode="bicubic").to(t.dtype)
        grid = grid.squeeze(0).permute(1, 2, 0).reshape(-1, dim)
        t = torch.cat([t[0, :1], grid], dim=0).unsqueeze(0)
    state[keys[0]] = t.squeeze(0) if squeeze else t
    return state


def swin_adapt_position_encoding(
    state: dict[str, Tensor], before: int, after: int, suffix: str = "relative_position_bias_table"
) -> dict[str, Tensor]:
    """Resize every Swin relative-position bias table from ``before`` to ``after`` px images, as METER does.

    METER ties the window to the final 32-px-stride grid: a ``(2g-1)² x heads`` table with ``g = size // 32`` is
    resized bicubically to ``(2g'-1)²``. The ``attn_mask`` and ``relative_position_index`` buffers are dropped
    (the model rebuilds them). Returns ``state`` (modified in place).
    """
    if after == before:
        return state
    side_before, side_after = 2 * (before // 32) - 1, 2 * (after // 32) - 1
    keys = [k for k in state if k.endswith(suffix)]
    if not keys:
        raise CheckpointError(f"no key ending in {suffix!r} to adapt from {before} to {after} px")
    for key in keys:
        table = state[key]  # ((2g-1)², heads)
        if table.shape[0] != side_before**2:
            raise CheckpointError(f"{key}: {table.shape[0]} rows, expected {side_before}² for a {before} px Swin")
        grid = table.transpose(0, 1).reshape(1, -1, side_before, side_before)
        grid = F.interpolate(grid.float(), size=(side_after, side_after), mode="bicubic").to(table.dtype)
        state[key] = grid[0].permute(1, 2, 0).reshape(-1, table.shape[1])
    for key in [k for k in state if k.endswith(("attn_mask", "relative_position_index"))]:
        del state[key]
    return state


# --- the config a checkpoint implies -----------------------------------------------------------------------


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def is_clip_checkpoint(state: Mapping[str, Tensor]) -> bool:
    """True for a CLIP-ViT vision encoder (``vit_model.visual.*``), False for Swin (``vit_model.layers.*``)."""
    if "vit_model.visual.conv1.weight" in state:
        return True
    if "vit_model.patch_embed.proj.weight" in state:
        return False
    raise CheckpointError(
        "not a METER checkpoint: no 'vit_model.visual.conv1.weight' (CLIP-ViT) or 'vit_model.patch_embed.proj.weight' (Swin)"
    )


def meter_config_from_official(
    state: Mapping[str, Tensor], hparams: Mapping[str, Any] | None = None, image_size: int | None = None,
    num_heads: int | None = None,
) -> MeterConfig:
    """The :class:`MeterConfig` of an official METER state dict: widths, depths, vocabulary and position tables
    from the tensors; heads, image size and the Swin name from METER's ``hyper_parameters`` config when present.

    ``image_size`` overrides the resolution (the position tables are then adapted on load); ``num_heads`` the
    text/fusion head count (default: the config's ``num_heads``, else width // 64 as in BERT/RoBERTa-base).
    """
    hp = dict(hparams or {})
    need = [
        "text_transformer.embeddings.word_embeddings.weight", "cross_modal_text_transform.weight",
        "cross_modal_text_layers.0.intermediate.dense.weight",
    ]
    absent = [k for k in need if k not in state]
    if absent:
        raise CheckpointError(f"not a METER checkpoint: missing {absent}")
    hidden = state["cross_modal_text_transform.weight"].shape[0]
    text_width = state["text_transformer.embeddings.word_embeddings.weight"].shape[1]
    heads = num_heads or int(hp.get("num_heads", 0)) or max(1, hidden // 64)
    vocab = state["text_transformer.embeddings.word_embeddings.weight"].shape[0]
    type_rows = state["text_transformer.embeddings.token_type_embeddings.weight"].shape[0]
    tokenizer = str(hp.get("tokenizer", ""))
    text_name = "roberta" if ("roberta" in tokenizer or (not tokenizer and type_rows == 1)) else "bert"
    text_layers = _count(state, r"text_transformer\.encoder\.layer\.(\d+)\.")
    positions = state["text_transformer.embeddings.position_embeddings.weight"].shape[0]
    text = TextEncoderConfig(
        "hf", text_name, vocab_size=vocab, width=text_width, max_len=int(hp.get("max_text_len", positions)),
        kwargs=dict(
            hidden_size=text_width, num_hidden_layers=text_layers,
            num_attention_heads=num_heads or int(hp.get("num_heads", 0)) or max(1, text_width // 64),
            intermediate_size=state["text_transformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=positions, type_vocab_size=type_rows,
        ),
    )
    if is_clip_checkpoint(state):
        conv = state["vit_model.visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = round((state["vit_model.visual.positional_embedding"].shape[-2] - 1) ** 0.5)
        size = image_size or int(hp.get("image_size", grid * patch))
        vision = VisionEncoderConfig(
            "timm", "vit_base_patch16_clip_quickgelu_224", img_size=size,
            kwargs=dict(
                patch_size=patch, embed_dim=width, num_heads=max(1, width // 64),
                depth=_count(state, r"vit_model\.visual\.transformer\.resblocks\.(\d+)\."),
                mlp_ratio=state["vit_model.visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            ),
        )
        pooling = "prepend_mean"
    else:
        embed = state["vit_model.patch_embed.proj.weight"]
        stages = _count(state, r"vit_model\.layers\.(\d+)\.")
        depths = tuple(_count(state, rf"vit_model\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages))
        swin_heads = tuple(state[f"vit_model.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(len(depths)))
        side = round(state["vit_model.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0] ** 0.5)
        import timm

        # METER names its Swin by timm's names; the sizes come from the tensors, so any Swin name builds it
        name = str(hp.get("vit", ""))
        name = name if name.startswith("swin_") and timm.is_model(name) else "swin_base_patch4_window12_384"
        vision = VisionEncoderConfig(
            "timm", name, img_size=image_size or int(hp.get("image_size", 384)),
            kwargs=dict(
                patch_size=embed.shape[-1], embed_dim=embed.shape[0], depths=depths, num_heads=swin_heads, window_size=(side + 1) // 2
            ),
        )
        pooling = "fused_mean"
    depth = _count(state, r"cross_modal_text_layers\.(\d+)\.")
    fusion = FusionConfig(
        "co_attention", depth=depth, width=hidden, num_heads=heads,
        ffn_dim=state["cross_modal_text_layers.0.intermediate.dense.weight"].shape[0],
        dropout=float(hp.get("drop_rate", 0.1)), layer_norm_eps=1e-12,
    )
    decoder = DecoderConfig(num_heads=heads)  # unused by encoder-only METER; kept consistent with the width
    return MeterConfig(vision=vision, text=text, fusion=fusion, decoder=decoder, dual_encoder=False, image_pooling=pooling)


def official_special_ids(cfg: MeterConfig) -> dict[str, int]:
    """pad/bos/eos ids of the tokenizer METER pairs with the text encoder (RoBERTa: 1/0/2, BERT: 0/101/102)."""
    return dict(pad_id=1, bos_id=0, eos_id=2) if cfg.text.name == "roberta" else dict(pad_id=0, bos_id=101, eos_id=102)


# --- key translation ---------------------------------------------------------------------------------------


def _rename(key: str, parts: list[tuple[str, str]]) -> str | None:
    for old, new in parts:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _vision_state(state: Mapping[str, Tensor], vision: nn.Module, clip: bool, img_size: int) -> dict[str, Tensor]:
    """METER's ``vit_model.*`` tensors in timm's layout for ``vision`` (a timm model), position tables adapted."""
    import sys

    sub = {k.removeprefix("vit_model."): v.clone() for k, v in state.items() if k.startswith("vit_model.")}
    if clip:
        patch = sub["visual.conv1.weight"].shape[-1]
        adapt_position_encoding(sub, after=img_size, patch_size=patch)
    else:
        side = round(sub["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0] ** 0.5)
        before = 32 * (side + 1) // 2
        swin_adapt_position_encoding(sub, before=before, after=img_size)
        sub = {k: v for k, v in sub.items() if not k.startswith("head.")}  # METER's Swin keeps an unused classifier
    filter_fn = sys.modules[type(vision).__module__].checkpoint_filter_fn
    return filter_fn(sub, vision)


def official_to_multiway(state: Mapping[str, Tensor], model: _Wrapper) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Translate an official METER state dict to ``model``'s keys.

    Returns ``(translated, ignored, unknown)``: ``ignored`` are official keys this wrapper does not use (other
    tasks' heads, the unused text pooler); ``unknown`` are keys that belong to no part of METER.
    """
    m = model.meter
    clip = is_clip_checkpoint(state)
    out: dict[str, Tensor] = {}
    for k, v in _vision_state(state, m.vision.model, clip, m.vision.img_size).items():
        out["meter.vision.model." + k] = v
    ignored, unknown = [], []
    heads = type(model).official_heads
    for key, value in state.items():
        if key.startswith("vit_model."):
            continue
        if key.startswith(_UNUSED_PREFIXES):
            ignored.append(key)
        elif key.startswith("text_transformer."):
            out["meter.text.model." + key.removeprefix("text_transformer.")] = value
        elif key.startswith(("cross_modal_text_transform.", "cross_modal_image_transform.")):
            side = "text" if key.startswith("cross_modal_text") else "image"
            out[f"meter.{side}_proj." + key.split(".", 1)[1]] = value
        elif key == "token_type_embeddings.weight":
            if value.shape[0] == 2:  # METER's NLVR2 initialisation: the second image starts as the first
                value = torch.cat([value, value[1:2]], dim=0)
            out["meter.type_embed.weight"] = value
        elif match := _CROSS_LAYER.match(key):
            side, idx, rest = match.groups()
            new = _rename(rest, _LAYER_PARTS)
            if new is None:
                unknown.append(key)
            else:
                out[f"meter.fusion.{side}_layers.{idx}.{new}"] = value
        elif key.startswith(("cross_modal_text_pooler.dense.", "cross_modal_image_pooler.dense.")):
            side = "text" if key.startswith("cross_modal_text") else "image"
            out[f"meter.{side}_pooler.0." + key.rsplit(".", 1)[1]] = value
        elif (prefix := next((p for p in heads if key.startswith(p)), None)) is not None:
            rest = key[len(prefix):]
            if prefix == "mlm_score.":
                rest = _rename(rest, _MLM_PARTS)
                if rest is None:
                    unknown.append(key)
                    continue
            out[heads[prefix] + rest] = value
        elif key.startswith(_ALL_HEAD_PREFIXES):
            ignored.append(key)
        else:
            unknown.append(key)
    return out, ignored, unknown


def load_official_checkpoint(
    model: _Wrapper, checkpoint: str | os.PathLike | Mapping[str, Tensor], strict: bool = True
) -> LoadReport:
    """Load a METER release (``.ckpt`` path or state dict) into a multiway METER task wrapper.

    * position tables are adapted to ``model``'s image size the way METER does;
    * heads of other tasks are ignored; this wrapper's heads absent from the checkpoint stay initialised (logged),
      and a head whose shape differs (another answer vocabulary) is re-initialised (logged);
    * anything else that does not fit — a missing, unknown or mismatched encoder/fusion tensor — raises
      :class:`~multiway.model.checkpoints.CheckpointError` listing the keys, unless ``strict=False``.
    """
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "state dict"
    state = read_official(checkpoint)[0] if not isinstance(checkpoint, Mapping) else dict(checkpoint)
    translated, ignored, unknown = official_to_multiway(state, model)
    expected = model.state_dict()
    head_names = tuple(type(model).official_heads.values())
    report = LoadReport(unexpected=ignored + unknown)
    to_load, mismatched = {}, []
    for key, value in translated.items():
        if key not in expected:
            unknown.append(key)
            report.unexpected.append(key)
        elif value.shape != expected[key].shape:
            if key.startswith(head_names):
                report.reset_heads.append(key)
            else:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}")
        else:
            to_load[key] = value
    report.missing = [k for k in expected if k not in to_load and k not in report.reset_heads]
    mismatched_keys = {s.split(":")[0] for s in mismatched}
    bad_missing = [k for k in report.missing if not k.startswith(head_names) and k not in mismatched_keys]
    if strict and (bad_missing or unknown or mismatched):
        raise_unfit(source, model, bad_missing, unknown, mismatched,
                    "build the model with multiway.meter.checkpoints.meter_config_from_official(state, hparams)")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    new_heads = [k for k in report.missing if k.startswith(head_names)]
    if new_heads or report.reset_heads:
        logger.warning("%s: heads initialised fresh: %s", source, _short(new_heads + report.reset_heads))
    logger.info("load_official_checkpoint(%s): %s", source, report)
    return report


#: wrapper class -> (constructor argument, official key whose first dimension sets it): head sizes a release fixes
_OFFICIAL_HEAD_SIZES: dict[type[_Wrapper], tuple[str, str]] = {METERForVQA: ("num_labels", "vqa_classifier.3.weight")}


def head_kwargs_from_official(task: str, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Constructor arguments of the ``task`` wrapper that the checkpoint fixes (VQA: the answer count)."""
    cls = OFFICIAL_TASKS[task]
    if cls not in _OFFICIAL_HEAD_SIZES:
        return {}
    argument, key = _OFFICIAL_HEAD_SIZES[cls]
    if key not in state:
        raise CheckpointError(f"task {task!r} needs {key!r} in the checkpoint to know its {argument}")
    return {argument: state[key].shape[0]}


def from_official(
    checkpoint: str | os.PathLike, task: str, image_size: int | None = None, num_heads: int | None = None, **head_kwargs: Any
) -> _Wrapper:
    """Build the ``task`` wrapper a METER release implies and load it: ``from_official("meter_vqa.ckpt", "vqa")``."""
    if task not in OFFICIAL_TASKS:
        raise ValueError(f"task={task!r} is not supported; accepted values: {', '.join(map(repr, OFFICIAL_TASKS))}")
    state, hparams = read_official(checkpoint)
    cfg = meter_config_from_official(state, hparams, image_size=image_size, num_heads=num_heads)
    kwargs = {**head_kwargs_from_official(task, state), **head_kwargs}
    model = OFFICIAL_TASKS[task](METERModel(cfg, **official_special_ids(cfg)), **kwargs)
    load_official_checkpoint(model, state)
    return model


# --- our METER files ---------------------------------------------------------------------------------------


def _head_kwargs(model: _Wrapper) -> dict[str, Any]:
    if isinstance(model, METERForSNLIVE):
        return {}
    if isinstance(model, METERForVQA):
        return {"num_labels": model.head[-1].out_features}
    if isinstance(model, METERForPretraining) and model.mim_head is not None:
        return {"mim_classes": model.mim_head[-1].out_features}
    return {}


def save_meter(model: _Wrapper, path: str | os.PathLike, tokenizer: Any = None, preprocessing: Mapping[str, Any] | None = None,
               task: Mapping[str, Any] | None = None) -> Path:
    """Save a METER task wrapper as safetensors with its config, class and special ids embedded (atomic write);
    ``tokenizer`` / ``preprocessing`` / ``task`` are embedded as :func:`multiway.save_pretrained` does, so
    ``multiway.load`` and ``multiway evaluate`` / ``predict`` need nothing else."""
    path = Path(path)
    m = model.meter
    metadata = {
        "format": "pt",
        "meter_config": json.dumps(m.config.to_dict()),
        "meter_task": type(model).__name__,
        "meter_head_kwargs": json.dumps(_head_kwargs(model)),
        "meter_special_ids": json.dumps(dict(pad_id=m.pad_id, bos_id=m.bos_id, eos_id=m.eos_id)),
        **extras_metadata(tokenizer, preprocessing, task),
    }
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path


def load_meter(path: str | os.PathLike) -> _Wrapper:
    """Rebuild a METER task wrapper from a file written by :func:`save_meter` (strict: every key must fit)."""
    from . import model as model_module

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"METER model file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "meter_config" not in meta:
        raise CheckpointError(f"{path}: not a multiway METER file (no 'meter_config' metadata); for METER releases use from_official")
    cfg = MeterConfig.from_dict(json.loads(meta["meter_config"]))
    cls = getattr(model_module, meta["meter_task"])
    model = cls(METERModel(cfg, **json.loads(meta["meter_special_ids"])), **json.loads(meta["meter_head_kwargs"]))
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {cls.__name__}: missing {_short(list(missing))}; unexpected {_short(list(unexpected))}")
    return model
