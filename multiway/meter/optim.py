"""METER's optimisation: three learning-rate levels, AdamW, linear warmup then linear decay to 0.

Paper (§4, "Optimization"): the pretrained encoders ("bottom") at 1e-5, the newly initialised projections and
fusion ("top") at 5e-5; the releases' heads at x5 (pre-training) to x50 (VQA). Groups carry ``lr_scale``
relative to ``OptimConfig.lr``, the same convention as :mod:`multiway.train.optim` (``lr = lr(step) * lr_scale``).

:func:`fit` runs a :class:`~multiway.train.loop.TrainTask` with these groups. It exists because the shared
loop builds its own groups (one backbone prefix, layer decay) and a cosine schedule; every METER task here
also runs unchanged under :func:`multiway.train.train` when the METER recipe is not needed.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Iterator

import torch
from torch import nn

from ..train.loop import batch_size_of
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
        decay = p.ndim > 1 and not name.rsplit(".", 1)[-1] in NO_DECAY_LEAVES and "norm" not in name.lower()
        key = (level, decay)
        if key not in groups:
            groups[key] = {
                "params": [], "names": [], "level": level,
                "weight_decay": optim.weight_decay if decay else 0.0, "lr_scale": scales[level],
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def linear_lr(step: int, lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup 0 -> lr over ``warmup_steps``, then linear decay to 0 at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    groups = meter_param_groups(model, optim)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def fit(
    model: nn.Module,
    task: Any,
    max_steps: int,
    optim: OptimConfig,
    precision: str = "fp32",
    grad_clip: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    evaluate: bool = True,
) -> dict[str, float]:
    """Train ``model`` for ``max_steps`` on a TrainTask with METER's groups and schedule, then evaluate.

    ``precision``: ``"fp32"`` or ``"bf16"`` (autocast). A step with a non-finite loss or gradient is skipped
    and counted in ``bad_steps``. Returns the mean logs of the run, ``samples_per_s`` (training only),
    ``bad_steps``, and the task's evaluation under ``eval/``.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r} is not supported; accepted values: 'fp32', 'bf16'")
    device = torch.device(device)
    torch.manual_seed(seed)
    model.to(device).train()
    opt = build_optimizer(model, optim)
    warmup = int(round(optim.warmup_ratio * max_steps))
    batches: Iterator[dict] = iter(task.train_batches(0, 1, seed, 0))
    sums: dict[str, float] = {}
    samples, bad, train_time = 0, 0, 0.0
    for step in range(max_steps):
        for g in opt.param_groups:
            g["lr"] = linear_lr(step, optim.lr, warmup, max_steps) * g["lr_scale"]
        batch = _to(next(batches), device)
        t0 = time.perf_counter()
        with _autocast(device, precision):
            loss, logs = task.loss(model, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
        if torch.isfinite(loss) and torch.isfinite(norm):
            opt.step()
            for k, v in {"loss": loss.item(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        else:
            bad += 1
        opt.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        samples += batch_size_of(batch)
    good = max(1, max_steps - bad)
    result = {k: v / good for k, v in sums.items()}
    result.update(samples_per_s=samples / max(train_time, 1e-9), bad_steps=float(bad))
    if evaluate and hasattr(task, "evaluate"):
        model.eval()
        with torch.no_grad(), _autocast(device, precision):
            result.update({f"eval/{k}": float(v) for k, v in (task.evaluate(model) or {}).items()})
        model.train()
    return result


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


__all__ = ["build_optimizer", "fit", "linear_lr", "meter_param_groups"]
