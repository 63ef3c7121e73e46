"""Checkpoint folders of a training run: where they live, how they are written atomically and verified, and the
pretrained-model export.

``checkpoints/step_XXXXXXXX/`` folders are written under a temporary name (``.tmp_step_*``), fsynced, given a
manifest of their files' sizes and SHA-256 last, then renamed; a folder that does not match its manifest is
corrupt. The trainer (:mod:`multiway.train.loop`) decides when to save and what goes in.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

CKPT_DIR = "checkpoints"


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(out_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


MANIFEST = "manifest.json"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); the previous checkpoints are untouched."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder whose files are missing, truncated or altered since they were written."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file of a checkpoint folder in ``manifest.json`` (written last)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def verify_checkpoint(folder: Path) -> None:
    """Raise :class:`CorruptCheckpointError` naming the first file of ``folder`` that differs from its manifest.

    Folders written before manifests existed (no ``manifest.json``) are accepted as they are."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{manifest}: unreadable manifest ({e})") from None
    for rel, want in entries.items():
        path = folder / rel
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing")
        if path.stat().st_size != want["size"]:
            raise CorruptCheckpointError(f"{path}: {path.stat().st_size} bytes, the manifest says {want['size']} (truncated?)")
        if _sha256(path) != want["sha256"]:
            raise CorruptCheckpointError(f"{path}: contents differ from the manifest's SHA-256")


def remove_stale_tmp_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp_step_*`` folders a killed save left behind (never complete, never loaded); returns them."""
    root = Path(out_dir) / CKPT_DIR
    stale = sorted(root.glob(".tmp_step_*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def read_checkpoint_file(path: Path) -> Any:
    """``torch.load`` of one file of a checkpoint folder, weights-only: tensors, containers, numbers and strings, plus
    the NumPy array types of NumPy's RNG state; nothing in the file can run code. An unreadable file, or one that
    needs other globals, is a :class:`CorruptCheckpointError`."""
    import numpy as np

    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: missing")
    core = getattr(np, "_core", None) or np.core  # NumPy 2 / NumPy 1
    numpy_rng_globals = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_rng_globals):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def export_pretrained(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Write ``state`` (a full state dict of ``model``) as a multiway safetensors file (official key layout)."""
    from safetensors.torch import save_file

    from ..model.checkpoints import _atomic_write
    from ..model.heads import model_name_of

    config = model.config
    head_config = model.head_config() if hasattr(model, "head_config") else {}
    metadata = {"format": "pt", "multiway_config": config.to_json(), "model_name": model_name_of(model),
                "head_config": json.dumps(head_config)}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
