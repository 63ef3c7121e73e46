"""``create_model``: build a backbone or a task model by name (official names), or from a checkpoint file."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import CheckpointError, check_shapes, layer_indices, load_checkpoint, read_checkpoint, read_safetensors_header
from .config import PRESETS, MultiwayConfig, get_config
from .heads import TASK_HEADS, BEiT3Model, model_name_of
from .multiway import MultiwayTransformer

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(MultiwayConfig)}

# The names the official release registers with timm.
OFFICIAL_MODELS = (
    "beit3_base_patch16_224_imageclassification",
    "beit3_large_patch16_224_imageclassification",
    "beit3_base_patch16_224_nlvr2",
    "beit3_large_patch16_224_nlvr2",
    "beit3_base_patch16_384_vqav2",
    "beit3_base_patch16_480_vqav2",
    "beit3_large_patch16_384_vqav2",
    "beit3_large_patch16_480_vqav2",
    "beit3_large_patch16_768_vqav2",
    "beit3_base_patch16_224_captioning",
    "beit3_base_patch16_480_captioning",
    "beit3_large_patch16_480_captioning",
    "beit3_base_patch16_224_retrieval",
    "beit3_base_patch16_384_retrieval",
    "beit3_large_patch16_384_retrieval",
)


def list_models() -> list[str]:
    """Every buildable name: each preset alone (the backbone) and each preset with each task suffix."""
    return sorted(list(PRESETS) + [f"{p}_{t}" for p in PRESETS for t in TASK_HEADS])


def split_model_name(name: str) -> tuple[str, str | None]:
    """``beit3_base_patch16_480_vqav2`` -> (``beit3_base_patch16_480``, ``vqav2``); a bare preset -> (name, None)."""
    if name in PRESETS:
        return name, None
    preset, _, task = name.rpartition("_")
    if preset in PRESETS and task in TASK_HEADS:
        return preset, task
    raise KeyError(
        f"unknown model {name!r}: expected a preset ({', '.join(sorted(PRESETS))}) optionally followed by "
        f"_<task> with task in ({', '.join(TASK_HEADS)}), e.g. beit3_base_patch16_480_vqav2"
    )


def build_model(config: MultiwayConfig, task: str | None = None, **head_kwargs: Any) -> nn.Module:
    """Build a backbone (``task=None``) or a task model from an explicit config."""
    if task is None:
        if head_kwargs:
            raise TypeError(f"a bare backbone takes no head arguments, got {sorted(head_kwargs)}")
        return MultiwayTransformer(config)
    if task not in TASK_HEADS:
        raise KeyError(f"unknown task {task!r}; available: {sorted(TASK_HEADS)}")
    cls, _ = TASK_HEADS[task]
    try:
        return cls(config, **head_kwargs)
    except TypeError as e:
        raise TypeError(f"{cls.__name__}: {e}; config fields are {sorted(_CONFIG_FIELDS)}") from e


def create_model(name_or_path: str | os.PathLike, pretrained: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by registered name, or rebuild one from a multiway safetensors file.

    Args:
        name_or_path: a preset (``beit3_base_patch16_224`` -> the backbone), a preset plus task suffix
            (``beit3_base_patch16_480_vqav2``, the official names), or a ``.safetensors`` file written by
            :func:`multiway.save_pretrained` (config embedded).
        pretrained: optional checkpoint (official ``.pth`` or ours) loaded with :func:`load_checkpoint`.
        **kwargs: config fields (``depth=2, embed_dim=64, ...``) and head arguments (``num_classes=10``).

    Example:
        >>> model = create_model("beit3_base_patch16_224_retrieval", depth=2, embed_dim=64, num_heads=4)
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a model name or a checkpoint path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.is_file():
        return _from_file(path, kwargs)
    preset, task = split_model_name(str(name_or_path))
    config_kwargs = {k: v for k, v in kwargs.items() if k in _CONFIG_FIELDS}
    head_kwargs = {k: v for k, v in kwargs.items() if k not in _CONFIG_FIELDS}
    task_overrides = TASK_HEADS[task][1] if task else {}
    config = get_config(preset, **{**task_overrides, **config_kwargs})
    model = build_model(config, task, **head_kwargs)
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    return model


def _from_file(path: Path, overrides: dict[str, Any]) -> nn.Module:
    """Rebuild a model from a multiway safetensors file, checking the file before allocating the model."""
    if path.suffix != ".safetensors":
        read_checkpoint(path)  # a clear error for files that are not checkpoints; pickles have no config
        raise ValueError(
            f"{path} has no embedded multiway config; build the model by name and load it: "
            "create_model('<name>', pretrained=path) (or convert it with `multiway convert`)"
        )
    shapes, metadata = read_safetensors_header(path)
    if "multiway_config" not in metadata:
        raise ValueError(
            f"{path} has no embedded multiway config; build the model by name and load it: "
            "create_model('<name>', pretrained=path) (or convert it with `multiway convert`)"
        )
    try:
        config = MultiwayConfig.from_json(metadata["multiway_config"])
        head_config = json.loads(metadata.get("head_config", "{}"))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: the embedded multiway_config/head_config is not valid ({type(e).__name__}: {e})") from e
    if not isinstance(head_config, dict):
        raise CheckpointError(f"{path}: the embedded head_config must be a JSON object, got {type(head_config).__name__}")
    task = metadata.get("model_name") or None
    if task is not None and task not in TASK_HEADS:
        raise CheckpointError(f"{path}: embedded model_name {task!r} is not a task ({', '.join(TASK_HEADS)})")
    check_file_matches_config(shapes, config, task, head_config, str(path))
    config = config.replace(**{k: v for k, v in overrides.items() if k in _CONFIG_FIELDS})
    head_kwargs = {**head_config, **{k: v for k, v in overrides.items() if k not in _CONFIG_FIELDS}}
    model = build_model(config, task, **head_kwargs)
    load_checkpoint(model, read_checkpoint(path)[0])
    return model


def fitting_presets(path: str | os.PathLike) -> list[str]:
    """The presets whose backbone has the shapes of the checkpoint's tensors (the vision position table may
    differ: it is interpolated on load), those of the same image size first. Reads the file once; builds each
    preset on the meta device (nothing allocated)."""
    state = read_checkpoint(path)[0]
    shapes = {k.removeprefix("beit3."): tuple(v.shape) for k, v in state.items()}
    positions = "encoder.embed_positions.A.weight"
    exact, resized = [], []
    for name, config in PRESETS.items():
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in MultiwayTransformer(config).state_dict().items()}
        if any(shapes.get(k) != v for k, v in expected.items() if k != positions):
            continue
        (exact if shapes.get(positions) == expected.get(positions) else resized).append(name)
    return exact + resized


def fitting_presets_message(path: str | os.PathLike) -> str:
    """The error for a checkpoint without an embedded config: what to pass, and the presets that fit its tensors."""
    fits = fitting_presets(path)
    hint = (f"presets whose shapes fit this file: {', '.join(fits)}" if fits
            else f"no preset has this file's shapes (presets: {', '.join(sorted(PRESETS))})")
    example = fits[0] if fits else "beit3_base_patch16_480"
    return (f"{path} has no embedded multiway config: name the model it holds with --model-name PRESET_TASK "
            f"(Python: model_name=...), e.g. {example}_<task> with <task> one of {', '.join(TASK_HEADS)}; {hint}")


def check_file_matches_config(
    shapes: dict[str, tuple[int, ...]], config: MultiwayConfig, task: str | None, head_config: dict[str, Any], source: str
) -> None:
    """Refuse a file whose tensor shapes do not match the model its embedded config describes.

    Nothing is allocated: a few shapes that follow from the config directly (the layer count, the text
    embedding) are compared first, so a config claiming thousands of layers is refused without building
    anything; then the model is built on the meta device and every key and shape is compared.
    Raises :class:`CheckpointError` naming the keys.
    """
    prefix = "beit3." if task else ""
    layers = layer_indices(shapes)
    if layers != set(range(config.depth)):
        held = f"layers {min(layers)}..{max(layers)} ({len(layers)} layers)" if layers else "no encoder layers"
        raise CheckpointError(f"{source}: its config says depth={config.depth} but the file holds {held}")
    embed_key = prefix + "text_embed.weight"
    if embed_key in shapes and tuple(shapes[embed_key]) != (config.vocab_size, config.embed_dim):
        raise CheckpointError(
            f"{source}: {embed_key} is {tuple(shapes[embed_key])} but its config says "
            f"(vocab_size, embed_dim) = ({config.vocab_size}, {config.embed_dim})"
        )
    with torch.device("meta"):
        try:
            skeleton = build_model(config, task, **head_config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: its embedded config does not build a model ({e})") from e
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    check_shapes(expected, shapes, source, f"the model its config describes ({type(skeleton).__name__})")


__all__ = ["OFFICIAL_MODELS", "BEiT3Model", "build_model", "create_model", "fitting_presets", "fitting_presets_message", "list_models",
           "model_name_of", "split_model_name"]
