"""The one training loop, shared by pretraining, fine-tuning and METER.

The trainer behind :func:`train`; its settings are :class:`~multiway.train.config.TrainConfig` and what it trains
on is a :class:`~multiway.train.task.TrainTask` (the contract is written in :mod:`multiway.train.task`)::

    def train(model, task, cfg, *, resume=True) -> dict[str, float]

What the loop does per optimizer step: ``accum_steps`` micro-batches (DDP gradient sync only on the last),
bf16 autocast on CUDA (``precision="auto"``; ``"fp16"`` adds a GradScaler, ``"fp32"`` disables autocast),
gradient clipping, AdamW with the parameter groups of :func:`multiway.train.optim.build_param_groups` (or the model's own
``optim_groups(cfg)`` when it defines one, each group with an ``lr_scale``), cosine (or linear) lr with linear
warmup. A non-finite loss or gradient norm on any rank skips the update (no change
to weights or optimizer state), is counted, and ``max_bad_steps`` in a row stop training with
:class:`NonFiniteLossError`.

Outputs in ``out_dir``: ``train_config.yaml``, ``metrics.csv`` (one row per log/eval event), ``tb/``
(TensorBoard), ``checkpoints/step_XXXXXXXX/`` (the last ``keep_last``) holding the resumable state
(``state.pt`` + ``rng_rank{r}.pt``, or ``sharded/`` written by ``torch.distributed.checkpoint`` under FSDP)
and ``model.safetensors`` — the model in the official key layout (``beit3.*``), loadable with
:func:`multiway.load_checkpoint` into any task head. Checkpoint folders are written under a temporary name,
fsynced, then renamed, so a crash never leaves a half-written checkpoint that looks complete.
"""
from __future__ import annotations

import errno
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from ..log import get_logger, progress
from . import distributed as D
from .checkpointing import (
    CKPT_DIR,
    CheckpointSaveError,
    CorruptCheckpointError,
    checkpoint_dirs,
    export_pretrained,
    fsync_dir,
    latest_checkpoint,
    read_checkpoint_file,
    remove_stale_tmp_dirs,
    verify_checkpoint,
    write_manifest,
)
from .config import TrainConfig
from .metrics_log import CSVLogger
from .optim import LRSchedule, build_param_groups
from .rng import rng_state, seed_everything, set_rng_state
from .task import TrainTask

logger = get_logger(__name__)

# Test hook: ``MULTIWAY_EXIT_AT_STEP=k`` makes the process die (os._exit, no cleanup) right after step k,
# as a SIGKILL would. Used by the resume-exactness test.
_EXIT_ENV = "MULTIWAY_EXIT_AT_STEP"


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive steps with a non-finite loss or gradient norm."""


# --- helpers --------------------------------------------------------------------------------------------


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, dict) and "num_samples" in batch:
        return int(batch["num_samples"])
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        n = batch_size_of(v)
        if n:
            return n
    return 0


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


# --- the loop -------------------------------------------------------------------------------------------


class _Trainer:
    def __init__(self, model: nn.Module, task: TrainTask, cfg: TrainConfig, resume: bool):
        self.cfg, self.task = cfg, task
        self.info = D.init_distributed()
        self.out = Path(cfg.out_dir)
        self.amp_dtype = resolve_precision(cfg.precision, self.info.device)
        seed_everything(cfg.seed)
        self.raw = model
        fsdp_dtype = self.amp_dtype if cfg.strategy == "fsdp" else None
        self.model = D.wrap_model(model, cfg.strategy, self.info, param_dtype=fsdp_dtype, find_unused_parameters=cfg.find_unused_parameters)
        self.fsdp = cfg.strategy == "fsdp"
        # A model may define its own groups (METER: three lr levels); otherwise layer decay + head lr scale.
        groups_fn = getattr(self.raw, "optim_groups", None)
        self.groups = groups_fn(cfg) if callable(groups_fn) else build_param_groups(self.raw, cfg)
        fused = self.info.device.type == "cuda" and not self.fsdp
        self.optimizer = torch.optim.AdamW(self.groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **({"fused": True} if fused else {}))
        self.schedule = LRSchedule(self.optimizer, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule)
        self.scaler = torch.amp.GradScaler(self.info.device.type, enabled=self.amp_dtype == torch.float16)
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model
        self.step = 0
        self.bad_in_row = 0
        self.bad_total = 0
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        D.barrier()
        self.rng_to_restore = None
        if self.info.is_main:
            for stale in remove_stale_tmp_dirs(self.out):
                logger.warning("removed %s, an incomplete checkpoint left by an interrupted save", stale)
        D.barrier()
        if resume:
            self.resume_from_latest()
        self.csv = CSVLogger(self.out / "metrics.csv", truncate_after_step=self.step) if self.info.is_main else None
        self.tb = self._tensorboard() if self.info.is_main else None

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed
            return None
        return SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if self.step else None)

    # -- state --

    def save(self) -> None:
        """Write ``checkpoints/step_N`` atomically: files go to ``.tmp_step_N``, a manifest of their sizes and hashes
        is written last, then the folder is renamed. A write error (full disk, I/O) on any rank removes the
        temporary folder and raises :class:`CheckpointSaveError` on every rank; older checkpoints are untouched."""
        root = self.out / CKPT_DIR
        final = root / f"step_{self.step:08d}"
        tmp = root / f".tmp_step_{self.step:08d}"
        failure: OSError | None = None
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                failure = e
        D.barrier()
        meta = {
            "step": self.step,
            "bad_total": self.bad_total,
            "bad_in_row": self.bad_in_row,
            "micro_batches": self.step * self.cfg.accum_steps,
            "world_size": self.info.world_size,
            "train_config": self.cfg.to_dict(),
        }
        from ..model.checkpoints import atomic_torch_save

        # Rank-local writes catch their errors; the collectives (full state dict, sharded save) always run on
        # every rank, so a failing rank never leaves the others waiting in a collective.
        try:
            atomic_torch_save(rng_state(), tmp / f"rng_rank{self.info.rank}.pt")
        except OSError as e:
            failure = failure or e
        full = D.full_model_state_dict(self.model)  # collective under FSDP
        if self.fsdp:
            D.save_sharded(tmp / "sharded", self.model, self.optimizer)
        if self.info.is_main and failure is None:
            try:
                state = {"meta": meta, "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict()}
                if not self.fsdp:
                    state["model"] = full
                    state["optimizer"] = self.optimizer.state_dict()
                atomic_torch_save(state, tmp / "state.pt")
                if hasattr(self.raw, "config") and hasattr(self.raw.config, "to_json"):
                    export_pretrained(self.raw, full, tmp / "model.safetensors")
            except OSError as e:
                failure = e
        D.barrier()
        if self.info.is_main and failure is None:
            try:
                for p in tmp.rglob("*"):
                    if p.is_file():
                        with open(p, "rb") as f:
                            os.fsync(f.fileno())
                write_manifest(tmp)
                fsync_dir(tmp)
            except OSError as e:
                failure = e
        if D.any_rank(failure is not None, self.info.device):
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(self.out)
            reason = f"{failure}" if failure is not None else "a write failed on another rank"
            hint = " (the disk is full: free space, then resume)" if getattr(failure, "errno", None) == errno.ENOSPC else ""
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointSaveError(
                f"could not write the checkpoint of step {self.step} to {final}: {reason}{hint}; the partial folder was removed and {kept}"
            ) from failure
        if self.info.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            for old in checkpoint_dirs(self.out)[: -self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        D.barrier()

    def resume_from_latest(self) -> None:
        """Load the newest checkpoint that verifies and reads; a corrupt or truncated one is named in a warning and
        the one before it is tried."""
        for ckpt in reversed(checkpoint_dirs(self.out)):
            try:
                verify_checkpoint(ckpt)
                state = read_checkpoint_file(ckpt / "state.pt")
                rng = read_checkpoint_file(ckpt / f"rng_rank{self.info.rank}.pt")
            except CorruptCheckpointError as e:
                logger.warning("checkpoint %s is corrupt or truncated (%s); falling back to the previous one", ckpt, e)
                continue
            self.load(ckpt, state, rng)
            return
        if checkpoint_dirs(self.out):
            logger.warning("no readable checkpoint in %s; starting from step 0", self.out / CKPT_DIR)

    def load(self, ckpt: Path, state: dict[str, Any] | None = None, rng: dict[str, Any] | None = None) -> None:
        state = read_checkpoint_file(ckpt / "state.pt") if state is None else state
        meta = state["meta"]
        if meta["world_size"] != self.info.world_size:
            raise RuntimeError(
                f"{ckpt}: saved with world_size={meta['world_size']} but this run has {self.info.world_size}; "
                "the data position is per rank, so resume with the same number of processes"
            )
        if self.fsdp:
            D.load_sharded(ckpt / "sharded", self.model, self.optimizer)
        else:
            D.unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.bad_total, self.bad_in_row = meta["step"], meta["bad_total"], meta["bad_in_row"]
        self.rng_to_restore = read_checkpoint_file(ckpt / f"rng_rank{self.info.rank}.pt") if rng is None else rng
        if self.info.is_main:
            logger.info("resumed from %s at step %d", ckpt, self.step)

    # -- steps --

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def train_step(self, batches: Iterator[dict]) -> tuple[bool, dict[str, float], int]:
        """One optimizer step over ``accum_steps`` micro-batches. Returns (updated, logs, samples)."""
        cfg, model = self.cfg, self.forward_model
        self.model.train()
        logs_sum: dict[str, float] = {}
        samples, finite = 0, True
        for micro in range(cfg.accum_steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"the task's train_batches ran out at step {self.step} (micro-batch {micro})") from None
            samples += batch_size_of(batch)
            batch = to_device(batch, self.info.device)
            last = micro == cfg.accum_steps - 1
            sync = nullcontext()
            if not last and hasattr(self.model, "no_sync"):
                sync = self.model.no_sync()
            elif self.fsdp:
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    loss, logs = self.task.loss(model, batch)
                if loss.ndim != 0:
                    raise ValueError(f"task.loss must return a scalar loss, got shape {tuple(loss.shape)}")
                finite &= bool(torch.isfinite(loss.detach()).item())
                self.scaler.scale(loss / cfg.accum_steps).backward()
            logs = {"loss": loss.detach().float().item(), **{k: float(v) for k, v in logs.items()}}
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + v
        logs = {k: v / cfg.accum_steps for k, v in logs_sum.items()}
        self.scaler.unscale_(self.optimizer)
        # With clipping off the norm is still computed (max_norm=inf never rescales) to catch non-finite grads.
        max_norm = cfg.grad_clip if cfg.grad_clip is not None and cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.raw.parameters() if p.grad is not None], max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        finite &= math.isfinite(grad_norm) or self.scaler.is_enabled()  # the scaler handles fp16 overflow
        bad = D.any_rank(not finite, self.info.device)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        logs["grad_norm"] = grad_norm
        return not bad, logs, samples

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        fn = getattr(self.task, "evaluate", None)
        if fn is None:
            return {}
        devices = [self.info.device.index or 0] if self.info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            state = (random.getstate(), np.random.get_state())
            D.unwrap(self.model).eval()
            try:
                with self.autocast():
                    result = fn(D.unwrap(self.model)) or {}
            finally:
                D.unwrap(self.model).train()
                random.setstate(state[0])
                np.random.set_state(state[1])
        return {f"eval/{k}": float(v) for k, v in result.items()}

    def log(self, row: dict[str, float]) -> None:
        if not self.info.is_main:
            return
        row = {"step": self.step, **row}
        self.csv.log(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, self.step)
            self.tb.flush()

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        exit_at = int(os.environ.get(_EXIT_ENV, "0") or 0)
        batches = iter(self.task.train_batches(self.info.rank, self.info.world_size, cfg.seed, self.step * cfg.accum_steps))
        if self.rng_to_restore is not None:
            set_rng_state(self.rng_to_restore)
        bar = None
        if cfg.progress and self.info.is_main:
            bar = progress(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True, smoothing=0.1)
        window: dict[str, float] = {}
        window_steps, window_samples, t0 = 0, 0, time.perf_counter()
        started = time.monotonic()
        last: dict[str, float] = {}
        while self.step < cfg.max_steps:
            lr = self.schedule.current_lr()
            updated, logs, samples = self.train_step(batches)
            self.step += 1
            self.schedule.step()
            if updated:
                self.bad_in_row = 0
                for k, v in logs.items():
                    window[k] = window.get(k, 0.0) + v
                window_steps += 1
            else:
                self.bad_in_row += 1
                self.bad_total += 1
                if self.info.is_main:
                    logger.warning("step %d: non-finite loss/gradient, update skipped (%d in a row, %d in total)",
                                   self.step, self.bad_in_row, self.bad_total)
                if self.bad_in_row >= cfg.max_bad_steps:
                    self.log({"bad_steps": self.bad_total})
                    raise NonFiniteLossError(
                        f"stopping at step {self.step}: {self.bad_in_row} consecutive steps had a non-finite loss or "
                        f"gradient norm (max_bad_steps={cfg.max_bad_steps}); lower the lr, raise warmup_steps, "
                        f"check the data, or resume from {latest_checkpoint(self.out)}"
                    )
            window_samples += samples
            out_of_time = cfg.max_minutes is not None and D.any_rank(time.monotonic() - started > cfg.max_minutes * 60,
                                                                      self.info.device)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or out_of_time:
                dt = time.perf_counter() - t0
                row = {k: v / max(1, window_steps) for k, v in window.items()}
                row = D.all_reduce_mean(row, self.info.device)
                total_samples = window_samples * self.info.world_size
                row.update(lr=lr, samples_per_s=total_samples / max(dt, 1e-9), bad_steps=self.bad_total)
                self.log(row)
                last = row
                if bar is not None:
                    bar.set_postfix_str(_postfix(row), refresh=False)
                window, window_steps, window_samples, t0 = {}, 0, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.max_steps and not out_of_time:
                ev = self.evaluate()
                if ev:
                    self.log(ev)
                    last.update(ev)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step != cfg.max_steps and not out_of_time:
                self.save()
            if exit_at and self.step == exit_at:
                os._exit(17)
            if out_of_time:
                break
        if bar is not None:
            bar.close()
        ev = self.evaluate()
        if ev:
            self.log(ev)
            last.update(ev)
        self.save()
        if self.tb is not None:
            self.tb.close()
        return last


def _postfix(row: dict[str, float]) -> str:
    parts = [f"loss={row.get('loss', float('nan')):.3f}"]
    for k, v in row.items():
        if "/" in k and (k.endswith("loss") or k.endswith("acc")):
            parts.append(f"{k}={v:.3f}")
    parts.append(f"lr={row['lr']:.2e}")
    parts.append(f"{row['samples_per_s']:.1f} samples/s")
    return " ".join(parts)


def train(model: nn.Module, task: TrainTask, cfg: TrainConfig, *, resume: bool = True) -> dict[str, float]:
    """Train ``model`` on ``task`` as ``cfg`` says; resume from the latest checkpoint in ``cfg.out_dir`` if any.

    Launch multi-process runs with ``torchrun`` (this function joins the process group from its environment).
    Returns the last logged metrics (averaged over ranks) plus the final evaluation.
    """
    trainer = _Trainer(model, task, cfg, resume)
    try:
        return trainer.run()
    except RuntimeError as e:
        # A dataloader worker's death surfaces wherever the main thread is; the task may know which sample it was on.
        explain = getattr(task, "explain_failure", None)
        better = explain(e) if callable(explain) else None
        if better is None:
            raise
        raise better from e
    finally:
        D.cleanup(trainer.info)


__all__ = ["NonFiniteLossError", "train"]
