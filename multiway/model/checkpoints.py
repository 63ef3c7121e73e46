"""Checkpoint I/O: official BEiT-3 ``.pth`` files and our safetensors format (config embedded).

Our module names are the official ones, so the only key translation is a prefix: task models keep the
backbone under ``beit3.``; a bare :class:`MultiwayTransformer` has no prefix. Pickled checkpoints are
read with ``torch.load(weights_only=True)`` only, so a file can never run code on load.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from .heads import model_name_of
from .multiway import MultiwayTransformer, interpolate_vision_positions

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "beit3."
VISION_POSITIONS = "encoder.embed_positions.A.weight"
FINAL_NORM = "encoder.layer_norm."
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did. Keys are in the model's naming."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # left at their initial values
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not used
    reset_heads: list[str] = field(default_factory=list)  # head weights whose shape differed
    interpolated: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)  # loaded tensors holding NaN or inf (a warning is logged)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "reset_heads", "interpolated", "non_finite"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name}: {_short(keys)}")
        return "; ".join(parts)


def _short(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def raise_unfit(source: Any, model: nn.Module, missing: list[str], unexpected: list[str], mismatched: list[str], hint: str,
                kind: str = "") -> None:
    """Raise the :class:`CheckpointError` of a checkpoint that does not fit ``model``: the missing and unexpected
    keys and the mismatched shapes (``"key: checkpoint (..) vs model (..)"``), a few of each, then ``hint`` (what to
    check). ``kind`` names the keys' part (``"backbone "``)."""
    lines = [f"{source} does not fit {type(model).__name__}:", *_key_report(missing, unexpected, mismatched, kind), f"  ({hint})"]
    raise CheckpointError("\n".join(lines))


def _key_report(missing: list[str], unexpected: list[str], mismatched: list[str], kind: str = "") -> list[str]:
    """The indented lines naming missing and unexpected keys and mismatched shapes (a few of each; empty ones left out)."""
    parts = ((f"missing {kind}keys", missing), (f"unexpected {kind}keys", unexpected), ("mismatched shapes", mismatched))
    return [f"  {label} ({len(keys)}): {_short(keys)}" for label, keys in parts if keys]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a state dict and its metadata from ``.safetensors`` or a pickled ``.pth``/``.pt``/``.bin``.

    Official files hold the weights under ``model`` or ``module``; both are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load — the pickle holds objects other than tensors and plain containers, and "
            f"loading it would execute code ({str(e).splitlines()[0]}). Only weights-only checkpoints are read."
        ) from e
    except Exception as e:  # the unpickler raises many types on garbage (KeyError, EOFError, RuntimeError ...)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    return unwrap_state_dict(obj, str(path)), {}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a ``.safetensors`` file, read from its header alone (no tensor is read).

    Returns ``({key: shape}, metadata)``. Used to check a file against its embedded config before anything
    is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def layer_indices(keys: Iterable[str]) -> set[int]:
    """The encoder layer numbers present among ``keys`` (``[beit3.]encoder.layers.<i>.…``)."""
    found = set()
    for key in keys:
        match = _LAYER_KEY.match(key.removeprefix(BACKBONE_PREFIX))
        if match:
            found.add(int(match.group(1)))
    return found


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str, what: str) -> None:
    """Refuse ``found`` (a file's key -> shape) unless it has exactly the keys and shapes of ``expected``.

    The error names the missing, unexpected and mismatched keys; ``what`` says what ``expected`` describes.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    differ = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    mismatched = [f"{k}: file {found[k]} vs expected {expected[k]}" for k in differ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: its tensors do not match {what}:", *_key_report(missing, unexpected, mismatched)]
        raise CheckpointError("\n".join(lines))


def non_finite_tensors(state: Mapping[str, Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or ±inf (one pass over the weights, at load time only)."""
    return [k for k, v in state.items() if v.is_floating_point() and v.device.type != "meta" and not bool(torch.isfinite(v).all())]


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """Take the tensor dict out of an official checkpoint (``{"model": ...}`` or ``{"module": ...}``)."""
    if isinstance(obj, Mapping):
        for key in ("model", "module", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, Mapping) else f"dict with keys {_short(list(map(str, obj)))}"
        raise CheckpointError(f"{source}: expected a dict of tensors (optionally under 'model' or 'module'), got {kind}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _align_prefix(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map checkpoint keys to the model's naming: add or strip the ``beit3.`` backbone prefix."""
    model_has_prefix = not isinstance(model, MultiwayTransformer)
    ckpt_has_prefix = any(k.startswith(BACKBONE_PREFIX) for k in state)
    if model_has_prefix and not ckpt_has_prefix:
        backbone_keys = set(model.beit3.state_dict())
        return {(BACKBONE_PREFIX + k if k in backbone_keys or k.startswith(FINAL_NORM) else k): v for k, v in state.items()}
    if not model_has_prefix and ckpt_has_prefix:
        return {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    return dict(state)


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Tensor],
    strict: bool = True,
) -> LoadReport:
    """Load official or multiway weights into ``model`` (a backbone or a task model).

    * the vision position table is interpolated when the image size differs;
    * a task-head tensor whose shape differs (e.g. another number of classes) is left freshly initialised;
    * head keys absent from the checkpoint (a new head) stay initialised; head keys of other tasks are ignored;
    * the final encoder LayerNorm is ignored by models built without it (as the official loader does);
    * anything else that does not fit — a missing, unexpected or mismatched backbone tensor — raises
      :class:`CheckpointError` listing the keys, unless ``strict=False``;
    * tensors holding NaN or inf are loaded, with a warning naming them (``LoadReport.non_finite``).

    Returns a :class:`LoadReport`; a summary is logged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a backbone or a task model), got {type(model).__name__}")
    if not isinstance(checkpoint, (str, os.PathLike, Mapping)):
        raise TypeError(f"checkpoint must be a file path or a state dict, got {type(checkpoint).__name__}")
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "state dict"
    state = read_checkpoint(checkpoint)[0] if not isinstance(checkpoint, Mapping) else unwrap_state_dict(checkpoint)
    state = _align_prefix(state, model)
    prefix = "" if isinstance(model, MultiwayTransformer) else BACKBONE_PREFIX
    expected = model.state_dict()
    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        in_backbone = key.startswith(prefix) if prefix else True
        if key not in expected:
            if in_backbone and key.startswith(prefix + FINAL_NORM):
                continue  # model built without the final LayerNorm (classification / VQA)
            report.unexpected.append(key)
            continue
        target = expected[key]
        if key == prefix + VISION_POSITIONS and value.shape != target.shape and value.shape[1:] == target.shape[1:]:
            value = interpolate_vision_positions(value, target.shape[0] - 3)
            report.interpolated.append(key)
        if value.shape != target.shape:
            if in_backbone:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
            else:
                report.reset_heads.append(key)
            continue
        to_load[key] = value
    mismatched_keys = {m.split(":")[0] for m in mismatched}
    report.missing = [k for k in expected if k not in to_load and k not in report.reset_heads and k not in mismatched_keys]
    bad_missing = [k for k in report.missing if not prefix or k.startswith(prefix)]
    bad_unexpected = [k for k in report.unexpected if not prefix or k.startswith(prefix)]
    if strict and (bad_missing or bad_unexpected or mismatched):
        raise_unfit(source, model, bad_missing, bad_unexpected, mismatched,
                    "check the preset: depth, embed_dim, vocab_size, shared_attention, vl_expert_layers", kind="backbone ")
    report.non_finite = non_finite_tensors(to_load)
    if report.non_finite:
        logger.warning("%s holds NaN or inf values in %d tensors: %s", source, len(report.non_finite), _short(report.non_finite))
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    if report.reset_heads:
        logger.warning("head tensors with a different shape were re-initialised: %s", _short(report.reset_heads))
    logger.info("load_checkpoint(%s): %s", source, report)
    return report


def _atomic_write(path: Path, write: callable) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: how the embedded SentencePiece model's pieces map to token ids (multiway.tokenizers.text, XLM-R / fairseq)
TOKENIZER_IDS = "xlmr_fairseq"


@dataclass
class ModelExtras:
    """What a multiway model file carries beside the weights (each None when the file does not hold it).

    tokenizer: the SentencePiece model bytes (ids: :data:`TOKENIZER_IDS`); preprocessing: ``img_size``, ``mean``,
    ``std``, ``interpolation``, ``resize`` (``"squash"`` or ``"center_crop"``), ``crop_pct``, ``max_text_len``;
    task: the downstream task (``task``, ``options``, ``labels``) a fine-tune saved.
    """

    tokenizer: bytes | None = None
    preprocessing: dict | None = None
    task: dict | None = None


def read_model_extras(path: str | os.PathLike) -> ModelExtras:
    """The tokenizer, preprocessing and task a ``.safetensors`` file embeds, read from its header alone.

    Other files (official ``.pth``) carry none: an empty :class:`ModelExtras`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return ModelExtras()
    metadata = read_safetensors_header(path)[1]
    extras = ModelExtras()
    try:
        if metadata.get("text_tokenizer"):
            ids = metadata.get("text_tokenizer_ids", TOKENIZER_IDS)
            if ids != TOKENIZER_IDS:
                raise CheckpointError(f"{path}: embedded tokenizer uses ids {ids!r}; this version reads {TOKENIZER_IDS!r}")
            extras.tokenizer = base64.b64decode(metadata["text_tokenizer"], validate=True)
        for name in ("preprocessing", "task"):
            if metadata.get(name):
                value = json.loads(metadata[name])
                if not isinstance(value, dict):
                    raise CheckpointError(f"{path}: embedded {name} must be a JSON object, got {type(value).__name__}")
                setattr(extras, name, value)
    except (ValueError, binascii.Error) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the embedded tokenizer/preprocessing/task is not valid ({type(e).__name__}: {e})") from e
    return extras


def extras_metadata(tokenizer: Any = None, preprocessing: Mapping[str, Any] | None = None,
                    task: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The safetensors metadata entries that embed a tokenizer, preprocessing and task (what :func:`read_model_extras`
    reads back); any model family's file takes them (:func:`save_pretrained`, ``multiway.meter.checkpoints.save_meter``).

    tokenizer: a :class:`~multiway.tokenizers.TextTokenizer` or the path of a SentencePiece model (None: none embedded).
    """
    metadata: dict[str, str] = {}
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from ..tokenizers.text import TextTokenizer

            tokenizer = TextTokenizer(tokenizer)
        if not hasattr(tokenizer, "serialized"):
            raise TypeError(f"tokenizer must be a TextTokenizer or a SentencePiece model path, got {type(tokenizer).__name__}")
        metadata["text_tokenizer"] = base64.b64encode(tokenizer.serialized()).decode("ascii")
        metadata["text_tokenizer_ids"] = TOKENIZER_IDS
    if preprocessing is not None:
        metadata["preprocessing"] = json.dumps(dict(preprocessing))
    if task is not None:
        metadata["task"] = json.dumps(dict(task))
    return metadata


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    official_layout: bool = True,
    tokenizer: Any = None,
    preprocessing: Mapping[str, Any] | None = None,
    task: Mapping[str, Any] | None = None,
) -> Path:
    """Save weights as safetensors with the config and model name embedded (atomic write).

    ``multiway.create_model(path)`` rebuilds the model from the file alone; ``multiway.load(path)`` also gets
    the tokenizer, preprocessing and task from it when they were given here:

    tokenizer: a :class:`~multiway.tokenizers.TextTokenizer` or the path of a SentencePiece model; its bytes are
        embedded (base64 under ``text_tokenizer``, ids convention under ``text_tokenizer_ids``).
    preprocessing: image size, mean/std, interpolation, resize mode, text length (see :class:`ModelExtras`).
    task: the downstream task's name, options and labels (what a fine-tune's ``task.json`` holds).

    The keys are the official ones, so the file also loads into official-layout code (with
    ``safetensors.torch.load_file``).
    """
    path = Path(path)
    config = model.config
    head_config = model.head_config() if hasattr(model, "head_config") else {}
    metadata = {
        "format": "pt",
        "multiway_config": config.to_json(),
        "model_name": model_name_of(model),
        "head_config": json.dumps(head_config),
    }
    metadata.update(extras_metadata(tokenizer, preprocessing, task))
    # safetensors refuses shared storage; clone so tied/expanded tensors save cleanly.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file + fsync + rename, so a crash never leaves a torn file."""
    path = Path(path)
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path
