"""METER's optimisation: three learning-rate levels, AdamW, linear warmup then linear decay to 0.

Paper (§4, "Optimization"): the pretrained encoders ("bottom") at 1e-5, the newly initialised projections and
fusion ("top") at 5e-5; the releases' heads at x5 (pre-training) to x50 (VQA). Groups carry ``lr_scale``
relative to ``OptimConfig.lr``, the same convention as :mod:`multiway.train.optim` (``lr = lr(step) * lr_scale``).

METER models train on the shared loop (:func:`multiway.train.train`): the task wrappers expose these groups
through ``optim_groups(cfg)``, and :func:`train_config` sets the linear schedule.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..train.config import TrainConfig
from .config import OptimConfig

NO_DECAY_LEAVES = ("bias", "cls_query", "logit_scale", "pos_embed", "cls_token", "position_embeddings")


def lr_level(name: str, wrapped: bool = True) -> str:
    """'bottom' (pretrained encoders), 'top' (projections, fusion, decoder) or 'head' (task heads).

    ``wrapped``: names come from a task wrapper (the model under ``meter.``, the rest heads)."""
    if wrapped and not name.startswith("meter."):
        return "head"
    return "bottom" if name.removeprefix("meter.").startswith(("vision.", "text.")) else "top"


def meter_param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: lr level x weight decay (none for biases, norms, embeddings' positions, 1-d tensors).

    ``model`` is a METER task wrapper (parameters under ``meter.`` are the model, the rest are heads) or a
    bare :class:`~multiway.meter.model.METERModel`.
    """
    scales = {"bottom": 1.0, "top": optim.lr_mult_top, "head": optim.lr_mult_head}
    wrapped = any(n.startswith("meter.") for n, _ in model.named_parameters())
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        level = lr_level(name, wrapped)
        decay = p.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_DECAY_LEAVES and "norm" not in name.lower()
        key = (level, decay)
        if key not in groups:
            groups[key] = {
                "params": [], "names": [], "level": level,
                "weight_decay": optim.weight_decay if decay else 0.0, "lr_scale": scales[level],
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def train_config(optim: OptimConfig, max_steps: int, out_dir: str, precision: str = "fp32", seed: int = 0,
                 grad_clip: float = 1.0, **overrides: Any) -> TrainConfig:
    """The shared loop's settings for METER's recipe: AdamW, ``warmup_ratio`` linear warmup, linear decay to 0.

    ``precision``: ``"fp32"`` or ``"bf16"`` (autocast). Logs once per run (``log_every = max_steps``), so the
    returned metrics are run averages; one checkpoint is written at the end.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r} is not supported; accepted values: 'fp32', 'bf16'")
    settings = dict(
        out_dir=out_dir, max_steps=max_steps, lr=optim.lr, min_lr=0.0, schedule="linear",
        warmup_steps=int(round(optim.warmup_ratio * max_steps)), weight_decay=optim.weight_decay,
        betas=tuple(optim.betas), eps=optim.eps, grad_clip=grad_clip, precision=precision, seed=seed,
        log_every=max_steps, save_every=max_steps, keep_last=1, max_bad_steps=max_steps, progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


__all__ = ["meter_param_groups", "train_config"]
