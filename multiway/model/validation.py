"""Input checks for the public model entry points (backbone ``forward``/``encode_*``, the task heads).

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, size or value) with a
message that names the argument, what was expected and what was given, instead of an error from deep inside
an embedding lookup or attention.

Cost: the checks read shapes and dtypes only (no kernel runs), except the id-range checks (token ids within
the vocabulary, text positions within the table), which need a min/max over the tensor. On CPU that is a
cheap reduction with no synchronisation, so it always runs. On an accelerator it would block the host until
the device catches up on every call, so there it is off by default (an out-of-range id then fails as a
device-side assert); ``set_device_value_checks(True)`` or ``MULTIWAY_CHECK_DEVICE_VALUES=1`` turns it on,
e.g. while debugging a data pipeline. Under ``torch.compile`` every check is skipped
(``torch.compiler.is_compiling()``): Python-side checks would only cause graph breaks there, and the eager
call the model is usually tried with first has run them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

_device_value_checks = os.environ.get("MULTIWAY_CHECK_DEVICE_VALUES", "") not in ("", "0")


def set_device_value_checks(enabled: bool) -> None:
    """Also check id ranges of tensors on accelerators (one host-device synchronisation per checked tensor)."""
    global _device_value_checks
    _device_value_checks = bool(enabled)


def checking() -> bool:
    """False while ``torch.compile`` traces: the checks are skipped there."""
    return not torch.compiler.is_compiling()


def _values_checkable(x: Tensor) -> bool:
    # Fake tensors (the planner, multiway/planning) carry shapes but no values.
    if isinstance(x, FakeTensor):
        return False
    return x.device.type == "cpu" or (_device_value_checks and x.device.type != "meta")


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def check_image(name: str, image: Any, config: Any, any_size: bool = False) -> None:
    """``image``: a float (B, C, H, W) tensor with B > 0, C = ``config.in_chans`` and H = W = ``config.img_size``
    (with ``any_size``: H and W positive multiples of the patch size)."""
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a (B, {config.in_chans}, H, W) float tensor, got {_describe(image)}")
    if image.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a float tensor (normalised pixels), got dtype {image.dtype}")
    batch, channels, height, width = image.shape
    if batch == 0:
        raise ValueError(f"{name} is an empty batch: shape {tuple(image.shape)}")
    if channels != config.in_chans:
        raise ValueError(f"{name} has {channels} channels but the model takes {config.in_chans} (shape {tuple(image.shape)})")
    patch = config.patch_size
    if height == 0 or width == 0 or height % patch or width % patch:
        raise ValueError(f"{name} is {height}x{width}: height and width must be positive multiples of the patch size {patch}")
    if not any_size and (height, width) != (config.img_size, config.img_size):
        raise ValueError(
            f"{name} is {height}x{width} but the model was built for {config.img_size}x{config.img_size}; resize the input "
            "or build the model with img_size=... (checkpoints interpolate their vision position table)"
        )


def check_token_ids(name: str, ids: Any, vocab_size: int) -> None:
    """``ids``: an integer (B, T) tensor with B, T > 0 and every id in ``[0, vocab_size)`` (values checked on CPU)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a (B, T) tensor of token ids, got {_describe(ids)}")
    if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (B, T), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(ids.shape)} (a text needs at least one token, e.g. <s>)")
    if _values_checkable(ids):
        low, high = ids.aminmax()
        if low < 0 or high >= vocab_size:
            bad = ((ids < 0) | (ids >= vocab_size)).nonzero()[0].tolist()
            raise ValueError(
                f"{name} holds token id {ids[tuple(bad)].item()} at position {tuple(bad)}; ids must be in [0, {vocab_size}) "
                f"(the model's vocab_size; {name} ranges over [{low.item()}, {high.item()}])"
            )


def check_mask(name: str, mask: Any, shape: tuple[int, ...], what: str) -> None:
    """A 0/1 mask (bool or integer) of exactly ``shape``; ``what`` names the tensor it must match."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool or integer tensor of shape {shape}, got {_describe(mask)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be bool or integer (1 / True = on), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {what}, {tuple(shape)}; got {tuple(mask.shape)}")


def check_same_batch(names_and_tensors: dict[str, Tensor | None]) -> None:
    """Every given tensor has the same batch size (dim 0)."""
    sizes = {name: t.shape[0] for name, t in names_and_tensors.items() if isinstance(t, Tensor) and t.dim() > 0}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"batch sizes differ: {listed}; they must be equal")


def check_backbone_inputs(
    config: Any,
    image: Tensor | None,
    text_ids: Tensor | None,
    text_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    image_masked_positions: Tensor | None,
    text_positions: Tensor | None,
    cached_keys: int,
    table_rows: int,
    any_image_size: bool = False,
) -> None:
    """Checks for :meth:`MultiwayTransformer.forward` (and so ``encode_image``/``encode_text``/``encode_fused``,
    whose ``padding_mask`` arrives as ``text_padding_mask``). ``cached_keys``: key/value rows already in the cache;
    ``table_rows``: rows of the text position table."""
    if image is None and text_ids is None:
        raise ValueError("pass an image, text_ids or both")
    num_vision = 0
    if image is not None:
        check_image("image", image, config, any_size=any_image_size)
        num_patches = (image.shape[-2] // config.patch_size) * (image.shape[-1] // config.patch_size)
        num_vision = 1 + num_patches
        if image_masked_positions is not None:
            check_mask("image_masked_positions", image_masked_positions, (image.shape[0], num_patches), "the image's patch grid (B, N)")
    elif image_masked_positions is not None:
        raise ValueError("image_masked_positions was given without an image")
    num_text = 0
    if text_ids is not None:
        check_token_ids("text_ids", text_ids, config.vocab_size)
        num_text = text_ids.shape[1]
        if text_padding_mask is not None:
            check_mask("text_padding_mask (padding_mask)", text_padding_mask, tuple(text_ids.shape), "text_ids (B, T)")
        if text_positions is not None:
            _check_positions(text_positions, text_ids, table_rows)
    elif text_padding_mask is not None or text_positions is not None:
        raise ValueError("text_padding_mask / text_positions were given without text_ids")
    check_same_batch({"image": image, "text_ids": text_ids})
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be a bool tensor with True = may attend, got {_describe(attn_mask)}")
        queries, keys = num_vision + num_text, num_vision + num_text + cached_keys
        if attn_mask.dim() not in (2, 3) or tuple(attn_mask.shape[-2:]) != (queries, keys):
            raise ValueError(
                f"attn_mask must be (L, L_keys) or (B, L, L_keys) with L = {queries} tokens of this call and "
                f"L_keys = {keys} (with {cached_keys} cached), got shape {tuple(attn_mask.shape)}"
            )


def _check_positions(positions: Tensor, text_ids: Tensor, table_rows: int) -> None:
    if not isinstance(positions, Tensor) or positions.is_floating_point() or positions.dtype == torch.bool:
        raise TypeError(f"text_positions must be an integer tensor of rows of the text position table, got {_describe(positions)}")
    batch, length = text_ids.shape
    if positions.dim() == 1:
        ok = positions.shape[0] == length
    else:
        ok = positions.dim() == 2 and positions.shape[1] == length and positions.shape[0] in (1, batch)
    if not ok:
        raise ValueError(f"text_positions must be (T,), (1, T) or (B, T) with (B, T) = {(batch, length)}, got {tuple(positions.shape)}")
    if _values_checkable(positions):
        low, high = positions.aminmax()
        if low < 0 or high >= table_rows:
            raise ValueError(
                f"text_positions must be rows in [0, {table_rows}) of the text position table (max_text_positions), "
                f"got values in [{low.item()}, {high.item()}]"
            )
