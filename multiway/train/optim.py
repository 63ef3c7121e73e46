"""AdamW parameter groups (weight-decay exemptions, layer-wise lr decay, head lr) and the lr schedule.

Rules (BEiT-3 official fine-tuning, ``optim_factory.get_parameter_groups``, extended as issue 4 asks):

* **no weight decay** for every parameter with ``ndim <= 1`` (biases, norms, scalars such as
  ``logit_scale``), every ``*.bias``, the position tables (``embed_positions``, ``pos_embed``), the
  ``cls_token`` / ``mask_token`` and any name in ``model.no_weight_decay_names`` / ``model.no_weight_decay()``.
  ``text_embed.weight`` *is* decayed, as in the official code.
* **layer id** (for layer-wise lr decay): 0 for names containing ``embed`` (text/vision embeddings, position
  tables), ``i + 1`` for names containing ``layers.i.``, ``L + 1`` for everything else (final norm, heads).
  The lr scale of layer id ``k`` is ``layer_decay ** (L + 1 - k)``.
* **head lr**: parameters outside the backbone (not under ``beit3.``) get ``head_lr_scale`` on top.

Every group carries ``lr_scale``; :class:`LRSchedule` sets ``group["lr"] = lr(step) * group["lr_scale"]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
NO_DECAY_KEYWORDS = ("embed_positions", "pos_embed", "cls_token", "mask_token", "logit_scale")


def clean_name(name: str) -> str:
    """Strip DDP / torch.compile / wrapper prefixes from a parameter name."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def _extra_no_decay(model: nn.Module) -> set[str]:
    names: set[str] = set(getattr(model, "no_weight_decay_names", ()) or ())
    fn = getattr(model, "no_weight_decay", None)
    if callable(fn):
        names |= set(fn())
    return names


def num_layers_of(model: nn.Module) -> int:
    """Depth L used for layer decay: ``model.config.depth`` or the largest ``layers.i.`` index + 1."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "depth"):
        return int(config.depth)
    ids = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER_RE.search(clean_name(n)))]
    return max(ids) + 1 if ids else 0


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for ``layers.i.``, L+1 otherwise."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    if "embed" in name:
        return 0
    return num_layers + 1


def needs_weight_decay(name: str, param: nn.Parameter, extra_no_decay: Iterable[str] = ()) -> bool:
    if param.ndim <= 1 or name.endswith(".bias") or name in set(extra_no_decay):
        return False
    leaf = name.rsplit(".", 1)[-1]
    return not any(k in name for k in NO_DECAY_KEYWORDS) and leaf not in NO_DECAY_KEYWORDS


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float = 1.0,
    head_lr_scale: float = 1.0,
    backbone_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups for ``model`` (call it on the unwrapped model; DDP prefixes are stripped).

    Returns a list of ``{"params", "weight_decay", "lr_scale", "names", "layer_id"}``; frozen parameters are skipped.
    ``backbone_prefix``: names under it are the backbone; others get ``head_lr_scale``. Default ``"beit3."``
    when the model has a ``beit3`` attribute, else everything counts as backbone.
    """
    if backbone_prefix is None:
        backbone_prefix = getattr(model, "backbone_prefix", "beit3." if hasattr(model, "beit3") else "")
    num_layers = num_layers_of(model)
    extra = _extra_no_decay(model)
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for raw_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_name(raw_name)
        decay = needs_weight_decay(name, p, extra)
        is_head = bool(backbone_prefix) and not name.startswith(backbone_prefix)
        lid = layer_id(name.removeprefix(backbone_prefix) if backbone_prefix else name, num_layers)
        scale = layer_decay ** (num_layers + 1 - lid) * (head_lr_scale if is_head else 1.0)
        key = (lid, decay, is_head)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale, "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_param_groups(model: nn.Module, cfg: Any) -> list[dict[str, Any]]:
    """:func:`param_groups` with ``weight_decay``, ``layer_decay``, ``head_lr_scale`` read from a ``TrainConfig``."""
    return param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.head_lr_scale)


def cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine from ``lr`` down to ``min_lr`` at ``max_steps``.

    ``step`` is the number of optimizer updates done so far (the lr used for update ``step + 1``).
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then linear decay to ``min_lr`` at ``max_steps`` (METER)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr + (min_lr - lr) * progress


SCHEDULES = {"cosine": cosine_lr, "linear": linear_lr}


class LRSchedule:
    """Sets every group's lr to ``shape(n) * group["lr_scale"]`` for the coming update ``n = step_count + 1``,
    where ``shape`` is :func:`cosine_lr` or :func:`linear_lr`.

    So with ``warmup_steps=W`` updates 1..W use ``lr·1/W .. lr`` (no wasted zero-lr update) and update
    ``max_steps`` uses ``min_lr``. Its state is ``step_count`` (updates done).
    """

    def __init__(self, optimizer, lr: float, min_lr: float, warmup_steps: int, max_steps: int, shape: str = "cosine"):
        if shape not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {shape!r}; accepted values: {sorted(SCHEDULES)}")
        self.shape = SCHEDULES[shape]
        self.optimizer, self.lr, self.min_lr = optimizer, lr, min_lr
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.step_count = 0
        self._apply()

    def current_lr(self) -> float:
        """The lr (before ``lr_scale``) of the coming update."""
        return self.shape(self.step_count + 1, self.lr, self.min_lr, self.warmup_steps, self.max_steps)

    def _apply(self) -> None:
        lr = self.current_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


__all__ = ["LRSchedule", "build_param_groups", "clean_name", "cosine_lr", "linear_lr", "layer_id", "needs_weight_decay", "param_groups"]
