"""The one training loop, shared by pretraining, fine-tuning and METER.

Contract (other modules code against exactly this)::

    @dataclass
    class TrainConfig: ...                      # YAML/JSON-serialisable; every field overridable from the CLI

    class TrainTask(Protocol):
        def train_batches(self, rank, world_size, seed, start_step) -> Iterator[dict]
        def loss(self, model, batch) -> tuple[Tensor, dict[str, float]]
        def evaluate(self, model) -> dict[str, float]          # optional

    def train(model, task, cfg, *, resume=True) -> dict[str, float]

**train_batches** yields this rank's micro-batches forever (or until exhausted), deterministically given
``(seed, rank, world_size)``. ``start_step`` is the number of *micro-batches* this rank has already consumed
(= optimizer steps done × ``accum_steps``; skipped non-finite steps count as steps), so a resumed run continues
the data exactly where it stopped. For ``world_size`` ranks × batch ``b`` to match 1 rank × batch ``world_size·b``
the task should split each global batch by rank (as :class:`MapDatasetTask` does).

**loss** runs the forward pass (inside the loop's autocast) and returns a scalar loss — a *mean* over the
micro-batch — and a dict of floats to log (``"loss"`` is added by the loop; use ``"<stream>/<name>"`` keys such
as ``"text/acc"``). The loop divides by ``accum_steps``, and DDP/FSDP average over ranks. A batch may carry
``"num_samples"`` (int) for the samples/s counter; otherwise the leading size of its first tensor is used.
Batches are moved to the device by the loop (tensors nested in dicts/lists/tuples).

**evaluate** is called on every rank with the unwrapped model in ``eval()`` mode under ``no_grad`` and autocast,
every ``eval_every`` steps and at the end; RNG states are forked so evaluation never changes training.
Its keys are logged as ``"eval/<key>"``; under FSDP all ranks must run it (sharded parameters).

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

import csv
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..config import from_dict
from . import distributed as D
from .optim import LRSchedule, build_param_groups

# Test hook: ``MULTIWAY_EXIT_AT_STEP=k`` makes the process die (os._exit, no cleanup) right after step k,
# as a SIGKILL would. Used by the resume-exactness test.
_EXIT_ENV = "MULTIWAY_EXIT_AT_STEP"


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing settings of :func:`train` (model/data settings live elsewhere)."""

    out_dir: str
    max_steps: int
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    layer_decay: float = 1.0
    head_lr_scale: float = 1.0
    grad_clip: float | None = 3.0
    accum_steps: int = 1
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or "bf16", "fp16", "fp32"
    strategy: str = "ddp"  # or "fsdp" (FSDP2 fully_shard per block)
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 3
    seed: int = 0
    max_bad_steps: int = 10  # consecutive non-finite losses before stopping
    eval_every: int = 0
    schedule: str = "cosine"  # or "linear" (warmup, then linear decay to min_lr)
    progress: bool = True  # tqdm bar on rank 0
    compile: bool = False  # torch.compile the model (GPU runs)
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.max_steps <= 0:
            raise ValueError(f"TrainConfig.max_steps must be > 0, got {self.max_steps}")
        if self.accum_steps < 1:
            raise ValueError(f"TrainConfig.accum_steps must be >= 1, got {self.accum_steps}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}: expected auto, bf16, fp16 or fp32")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"TrainConfig.schedule={self.schedule!r}: expected 'cosine' or 'linear'")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"TrainConfig.strategy={self.strategy!r}: expected 'ddp' or 'fsdp'")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, d)


@runtime_checkable
class TrainTask(Protocol):
    def train_batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[dict]: ...

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]: ...


# --- map-style datasets ---------------------------------------------------------------------------------


def _mix(*ints: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style)."""
    h = 0x9E3779B97F4A7C15
    for i in ints:
        h = (h ^ (int(i) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class _SeededItems(Dataset):
    """Wraps a dataset so item ``(index, seed)`` is fetched with python/numpy/torch RNGs seeded by ``seed``.

    Random augmentation then depends only on (run seed, epoch, index): the same on any rank layout, with any
    number of workers, and after a resume. The caller's RNG states are restored afterwards.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class MapDatasetTask:
    """Adapts a map-style dataset to :class:`TrainTask` (what fine-tuning uses).

    Each epoch is a permutation drawn from ``(seed, epoch)``; it is cut into global batches of
    ``world_size × batch_size`` (the incomplete tail is dropped) and rank ``r`` takes rows
    ``[r·b, (r+1)·b)`` of each, so 2 ranks × b see exactly what 1 rank × 2b sees. Every item is fetched
    with RNGs seeded from ``(seed, epoch, index)``, so augmentation is reproducible too. ``start_step``
    (micro-batches already consumed) resumes mid-epoch exactly. A dataset with ``set_epoch(epoch)`` gets it.

    Args:
        dataset: map-style dataset.
        collate_fn: list of items -> batch dict.
        batch_size: micro-batch size per rank.
        loss_fn: ``(model, batch) -> (loss, logs)``.
        eval_fn: optional ``(model) -> dict`` called as :meth:`evaluate`.
    """

    def __init__(
        self,
        dataset: Dataset,
        collate_fn: Callable[[list], dict] | None,
        batch_size: int,
        loss_fn: Callable[[nn.Module, dict], tuple[Tensor, dict[str, float]]],
        num_workers: int = 0,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    ):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.loss_fn, self.num_workers, self.eval_fn = loss_fn, num_workers, eval_fn

    def batches_per_epoch(self, world_size: int) -> int:
        n = len(self.dataset) // (self.batch_size * world_size)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError(
                f"MapDatasetTask: dataset of {len(self.dataset)} items is smaller than one global batch "  # type: ignore[arg-type]
                f"({world_size} ranks x batch_size {self.batch_size})"
            )
        return n

    def epoch_batches(self, epoch: int, rank: int, world_size: int, seed: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of ``epoch``: lists of (index, item seed)."""
        g = torch.Generator().manual_seed(_mix(seed, epoch))
        perm = torch.randperm(len(self.dataset), generator=g).tolist()  # type: ignore[arg-type]
        b, per_epoch = self.batch_size, self.batches_per_epoch(world_size)
        out = []
        for j in range(per_epoch):
            start = j * b * world_size + rank * b
            out.append([(i, _mix(seed, epoch, i, 1)) for i in perm[start : start + b]])
        return out

    def train_batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[dict]:
        per_epoch = self.batches_per_epoch(world_size)
        epoch, skip = divmod(start_step, per_epoch)
        items = _SeededItems(self.dataset)
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            batches = self.epoch_batches(epoch, rank, world_size, seed)[skip:]
            loader = DataLoader(
                items,
                batch_sampler=batches,
                collate_fn=self.collate_fn,
                num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(_mix(seed, epoch, rank, 2)),  # keeps the global RNG untouched
            )
            yield from loader
            epoch, skip = epoch + 1, 0

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        return self.loss_fn(model, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.eval_fn(model) if self.eval_fn is not None else {}


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


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class CSVLogger:
    """Append rows of ``{column: value}`` to a CSV; the header grows (file rewritten) when new keys appear."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if truncate_after_step is None or int(float(r["step"])) <= truncate_after_step]
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new or not self.path.exists():
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of ``RUN_DIR/metrics.csv`` as dicts of floats (empty cells dropped)."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


# --- checkpoints ----------------------------------------------------------------------------------------

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


def _fsync_dir(path: Path) -> None:
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
    from ..model.factory import model_name_of

    config = model.config
    head_config = model.head_config() if hasattr(model, "head_config") else {}
    metadata = {"format": "pt", "multiway_config": config.to_json(), "model_name": model_name_of(model), "head_config": json.dumps(head_config)}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


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
        if resume and (ckpt := latest_checkpoint(self.out)) is not None:
            self.load(ckpt)
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
        root = self.out / CKPT_DIR
        final = root / f"step_{self.step:08d}"
        tmp = root / f".tmp_step_{self.step:08d}"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
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

        atomic_torch_save(rng_state(), tmp / f"rng_rank{self.info.rank}.pt")
        full = D.full_model_state_dict(self.model)  # collective under FSDP
        if self.fsdp:
            D.save_sharded(tmp / "sharded", self.model, self.optimizer)
        if self.info.is_main:
            state = {"meta": meta, "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict()}
            if not self.fsdp:
                state["model"] = full
                state["optimizer"] = self.optimizer.state_dict()
            atomic_torch_save(state, tmp / "state.pt")
            if hasattr(self.raw, "config") and hasattr(self.raw.config, "to_json"):
                export_pretrained(self.raw, full, tmp / "model.safetensors")
        D.barrier()
        if self.info.is_main:
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            for old in checkpoint_dirs(self.out)[: -self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        D.barrier()

    def load(self, ckpt: Path) -> None:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
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
        rng_file = ckpt / f"rng_rank{self.info.rank}.pt"
        self.rng_to_restore = torch.load(rng_file, map_location="cpu", weights_only=False)
        if self.info.is_main:
            print(f"[multiway] resumed from {ckpt} at step {self.step}", flush=True)

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
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True, smoothing=0.1)
        window: dict[str, float] = {}
        window_steps, window_samples, t0 = 0, 0, time.perf_counter()
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
                    print(f"[multiway] step {self.step}: non-finite loss/gradient, update skipped "
                          f"({self.bad_in_row} in a row, {self.bad_total} in total)", flush=True)
                if self.bad_in_row >= cfg.max_bad_steps:
                    self.log({"bad_steps": self.bad_total})
                    raise NonFiniteLossError(
                        f"stopping at step {self.step}: {self.bad_in_row} consecutive steps had a non-finite loss or "
                        f"gradient norm (max_bad_steps={cfg.max_bad_steps}); lower the lr, raise warmup_steps, "
                        f"check the data, or resume from {latest_checkpoint(self.out)}"
                    )
            window_samples += samples
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
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
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.max_steps:
                ev = self.evaluate()
                if ev:
                    self.log(ev)
                    last.update(ev)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step != cfg.max_steps:
                self.save()
            if exit_at and self.step == exit_at:
                os._exit(17)
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
    finally:
        D.cleanup(trainer.info)


__all__ = [
    "MapDatasetTask",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainTask",
    "checkpoint_dirs",
    "latest_checkpoint",
    "read_metrics",
    "train",
]
