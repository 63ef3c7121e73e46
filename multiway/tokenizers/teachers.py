"""Frozen teachers of VQ-KD training: callables images (B, 3, H, W) in [0, 1] -> features (B, N, C) on the tokenizer's
patch grid (:func:`build_teacher` builds one from a spec; nothing is downloaded)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..constants import IMAGENET_MEAN, IMAGENET_STD, VL_MEAN, VL_STD
from .vqkd import read_official_checkpoint

# ----------------------------------------------------------------------------------------------------------------
# teachers: frozen callables images (B, 3, H, W) in [0, 1] -> features (B, N, C) on the tokenizer's patch grid

class PixelTeacher(nn.Module):
    """Targets = the patch's pixels, normalised with the ImageNet mean/std (no per-patch normalisation, so
    colour and brightness stay in the target). Needs no weights; meant for the built-in data."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        p = self.patch_size
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, 3*p*p)


class FeatureTeacher(nn.Module):
    """Wraps a frozen feature extractor: normalises the input, calls it, and puts its patch features on the
    tokenizer's grid.

    ``fn`` gets normalised images (B, 3, S, S) and returns (B, N', C), (B, C, h', w'), or (B, 1+N', C) when
    ``num_prefix_tokens`` says how many leading tokens (CLS, registers) to drop.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], grid: int, input_size: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.fn = fn
        self.grid, self.input_size, self.num_prefix_tokens = grid, input_size, num_prefix_tokens
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        if isinstance(fn, nn.Module):
            fn.eval()
            for p in fn.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        out = self.fn((x - self.mean) / self.std)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.dim() == 4:  # (B, C, h, w)
            fmap = out
        else:
            out = out[:, self.num_prefix_tokens:]
            B, N, C = out.shape
            h = math.isqrt(N)
            if h * h != N:
                raise ValueError(f"teacher returned {N} tokens, not a square grid (set num_prefix_tokens?)")
            fmap = out.transpose(1, 2).reshape(B, C, h, h)
        if fmap.shape[-1] != self.grid:  # match the tokenizer's patch grid
            fmap = F.interpolate(fmap.float(), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return fmap.flatten(2).transpose(1, 2).float()


def _load_local_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return read_official_checkpoint(path)


def build_teacher(spec: str | Callable[[torch.Tensor], torch.Tensor], grid: int, patch_size: int,
                  weights: str | os.PathLike | None = None) -> nn.Module:
    """Frozen teacher from a spec. Nothing is downloaded.

    * ``"pixels"`` — :class:`PixelTeacher`;
    * ``"timm:<model_name>"`` with ``weights=<local .safetensors/.pth>`` — the model's patch tokens
      (``forward_features`` minus its prefix tokens), normalised with the model's own mean/std;
    * ``"torchscript:<file>"`` (or a path ending in ``.ts``/``.torchscript``/``.jit``) — a scripted module
      taking ImageNet-normalised images;
    * ``"multiway:<checkpoint or preset>"`` — a multiway vision encoder, via ``multiway.create_model`` and its
      ``encode_image`` (patch features, CLS dropped);
    * any callable — wrapped by :class:`FeatureTeacher` with ImageNet normalisation.
    """
    if callable(spec) and not isinstance(spec, str):
        return FeatureTeacher(spec, grid)
    if spec == "pixels":
        return PixelTeacher(patch_size)
    kind, _, arg = spec.partition(":")
    if kind == "timm":
        import timm

        model = timm.create_model(arg, pretrained=False, num_classes=0)
        if weights is None:
            raise ValueError("a timm teacher needs weights=<local file> (nothing is downloaded)")
        missing, unexpected = model.load_state_dict(_load_local_state_dict(Path(weights)), strict=False)
        if missing:
            raise KeyError(f"{weights}: missing keys for timm model {arg}: {missing[:10]}")
        cfg = model.pretrained_cfg
        size = cfg.get("input_size", (3, 224, 224))[-1]
        return FeatureTeacher(model.forward_features, grid, size, cfg.get("mean", IMAGENET_MEAN),
                              cfg.get("std", IMAGENET_STD), getattr(model, "num_prefix_tokens", 1))
    if kind == "torchscript" or Path(spec).suffix in (".ts", ".torchscript", ".jit"):
        path = arg if kind == "torchscript" else spec
        if not Path(path).is_file():
            raise FileNotFoundError(f"TorchScript teacher not found: {path}")
        return FeatureTeacher(torch.jit.load(path, map_location="cpu"), grid)
    if kind == "multiway":
        from multiway.model import create_model

        model = create_model(arg)
        encode = getattr(model, "encode_image", None)
        if encode is None:
            raise AttributeError(f"multiway model {arg!r} has no encode_image(images) method")
        size = getattr(getattr(model, "config", None), "img_size", None)

        def fn(x: torch.Tensor) -> torch.Tensor:
            out = encode(x)
            return out[:, 1:] if out.dim() == 3 and math.isqrt(out.shape[1] - 1) ** 2 == out.shape[1] - 1 else out

        teacher = FeatureTeacher(fn, grid, size, mean=VL_MEAN, std=VL_STD)
        teacher.add_module("model", model.eval().requires_grad_(False))
        return teacher
    raise ValueError(f"unknown teacher {spec!r}: use 'pixels', 'timm:<name>', 'torchscript:<file>', "
                     f"'multiway:<checkpoint>' or a callable")
