"""The ``TrainTask`` contract of the one training loop, and ``MapDatasetTask`` (a map-style dataset as a task).

The contract (other modules code against exactly this)::

    class TrainTask(Protocol):
        def train_batches(self, rank, world_size, seed, start_step) -> Iterator[dict]
        def loss(self, model, batch) -> tuple[Tensor, dict[str, float]]
        def evaluate(self, model) -> dict[str, float]          # optional

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
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .rng import mix_seeds


@runtime_checkable
class TrainTask(Protocol):
    """What :func:`multiway.train.train` trains on (the contract is in the module docstring)."""

    def train_batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[dict]: ...

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]: ...




class SampleLoadError(RuntimeError):
    """Loading a training sample failed (an exception in ``__getitem__``, or a dataloader worker that died or
    stalled); the message names the sample index and the dataset."""


class _SeededItems(Dataset):
    """Wraps a dataset so item ``(index, seed)`` is fetched with python/numpy/torch RNGs seeded by ``seed``.

    Random augmentation then depends only on (run seed, epoch, index): the same on any rank layout, with any
    number of workers, and after a resume. The caller's RNG states are restored afterwards.

    With dataloader workers, each worker records the index it is loading in a shared slot, so when a worker dies
    (a segfault, ``os._exit``, the OOM killer) or stalls, :meth:`in_flight` names the samples it was on.
    """

    def __init__(self, dataset: Dataset, num_workers: int = 0):
        self.dataset = dataset
        self.slots = multiprocessing.Array("q", [-1] * max(1, num_workers), lock=False) if num_workers > 0 else None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def in_flight(self) -> list[int]:
        """Indices the workers had started but not finished loading."""
        return sorted(i for i in self.slots if i >= 0) if self.slots is not None else []

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        worker = torch.utils.data.get_worker_info()
        if self.slots is not None and worker is not None:
            self.slots[worker.id] = index
        states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            sample = self.dataset[index]
        except Exception as e:
            raise SampleLoadError(f"loading sample {index} of {type(self.dataset).__name__} failed: {type(e).__name__}: {e}") from e
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
        if self.slots is not None and worker is not None:
            self.slots[worker.id] = -1
        return sample


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
        worker_timeout: seconds to wait for one batch from a dataloader worker before raising (0 = wait forever).

    A sample whose loading raises, and a worker that dies or stalls past ``worker_timeout``, end training with a
    :class:`SampleLoadError` naming the sample index.
    """

    def __init__(
        self,
        dataset: Dataset,
        collate_fn: Callable[[list], dict] | None,
        batch_size: int,
        loss_fn: Callable[[nn.Module, dict], tuple[Tensor, dict[str, float]]],
        num_workers: int = 0,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        worker_timeout: float = 0.0,
    ):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.loss_fn, self.num_workers, self.eval_fn = loss_fn, num_workers, eval_fn
        self.worker_timeout = worker_timeout

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
        g = torch.Generator().manual_seed(mix_seeds(seed, epoch))
        perm = torch.randperm(len(self.dataset), generator=g).tolist()  # type: ignore[arg-type]
        b, per_epoch = self.batch_size, self.batches_per_epoch(world_size)
        out = []
        for j in range(per_epoch):
            start = j * b * world_size + rank * b
            out.append([(i, mix_seeds(seed, epoch, i, 1)) for i in perm[start : start + b]])
        return out

    def train_batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[dict]:
        per_epoch = self.batches_per_epoch(world_size)
        epoch, skip = divmod(start_step, per_epoch)
        items = _SeededItems(self.dataset, self.num_workers)
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            batches = self.epoch_batches(epoch, rank, world_size, seed)[skip:]
            loader = DataLoader(
                items,
                batch_sampler=batches,
                collate_fn=self.collate_fn,
                num_workers=self.num_workers,
                timeout=self.worker_timeout if self.num_workers > 0 else 0,
                generator=torch.Generator().manual_seed(mix_seeds(seed, epoch, rank, 2)),  # keeps the global RNG untouched
            )
            yield from self._guarded(iter(loader), items)
            epoch, skip = epoch + 1, 0

    def _guarded(self, batches: Iterator[dict], items: _SeededItems) -> Iterator[dict]:
        """The loader's batches; a dead or stalled worker becomes a :class:`SampleLoadError` naming its samples."""
        self._items = items
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as e:
                better = self.explain_failure(e)
                if better is None:
                    raise
                raise better from e
            yield batch

    def explain_failure(self, error: BaseException) -> SampleLoadError | None:
        """A :class:`SampleLoadError` naming the samples in flight when ``error`` is PyTorch's report of a dataloader
        worker that died ("exited unexpectedly", raised from its SIGCHLD handler at any point of the step) or timed
        out; None for any other error. :func:`train` asks the task this when a step fails."""
        items = getattr(self, "_items", None)
        text = str(error)
        if isinstance(error, SampleLoadError) or items is None or self.num_workers == 0:
            return None
        if not ("DataLoader worker" in text or "DataLoader timed out" in text):
            return None
        pending = items.in_flight()
        what = f"sample(s) {pending}" if pending else "a batch (no sample was in progress)"
        return SampleLoadError(f"a dataloader worker of {type(self.dataset).__name__} died or stalled while loading {what}: {text}")

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        return self.loss_fn(model, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.eval_fn(model) if self.eval_fn is not None else {}
