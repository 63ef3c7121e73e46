"""Distributed plumbing for the training loop: ``torchrun`` environment, DDP / FSDP2, sharded checkpoints.

Launch with PyTorch's own launcher (no home-made one)::

    torchrun --nproc_per_node 8 -m multiway pretrain --config configs/pretrain_base.yaml strategy=fsdp

:func:`init_distributed` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set by ``torchrun`` and starts the
process group (NCCL on CUDA, gloo on CPU). Without those variables it is a single process.
:func:`wrap_model` applies DDP or FSDP2 (``fully_shard`` on every Transformer block, then on the root).
Under FSDP the training state is saved with ``torch.distributed.checkpoint`` (one shard file per rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # we created the process group, so we destroy it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Start (or join) the process group described by the ``torchrun`` environment variables.

    ``device``: ``"cuda"`` / ``"cpu"``; default CUDA when available. Each rank uses ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    created = False
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch multi-process runs with torchrun")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        created = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, dev, created)


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks. Keys missing on a rank count as absent there (mean over present)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(keys, sorted(values))
    all_keys = sorted(set().union(*keys))
    t = torch.zeros(2, len(all_keys), dtype=torch.float64, device=device)
    for i, k in enumerate(all_keys):
        if k in values:
            t[0, i], t[1, i] = float(values[k]), 1.0
    dist.all_reduce(t)
    return {k: (t[0, i] / t[1, i]).item() for i, k in enumerate(all_keys) if t[1, i] > 0}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: children of every ``layers`` ModuleList (the Transformer blocks)."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "blocks", "layer"):
            blocks.extend(module)
    return blocks


def wrap_model(
    model: nn.Module, strategy: str, info: DistInfo, param_dtype: torch.dtype | None = None, find_unused_parameters: bool = False
) -> nn.Module:
    """Move ``model`` to the device and wrap it for data parallelism.

    * ``"ddp"``: ``DistributedDataParallel`` (no-op wrapper in a single process: the model is returned).
    * ``"fsdp"``: FSDP2 — ``fully_shard`` every Transformer block, then the root; parameters become DTensors
      sharded over ranks. ``param_dtype`` (e.g. bf16) sets the FSDP mixed-precision policy (fp32 reductions).
      The returned module *is* the input module (FSDP2 shards in place).
    """
    model.to(info.device)
    if strategy == "ddp":
        if not info.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise RuntimeError("strategy='fsdp' needs a process group: launch with torchrun (even with 1 process)")
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError(f"strategy='fsdp': found no Transformer blocks (a ModuleList named 'layers') in {type(model).__name__}")
        # fully_shard cannot split a 0-dim parameter (the dual encoders' logit_scale, whose shape [] is the official
        # layout): such parameters stay replicated plain tensors and their gradients are averaged by a hook.
        scalars = {p for p in model.parameters() if p.ndim == 0}
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=scalars & set(block.parameters()) or None)
        fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=scalars or None)
        average_gradients_across_ranks(scalars)
        return model
    raise ValueError(f"unknown strategy {strategy!r}: expected 'ddp' or 'fsdp'")


def average_gradients_across_ranks(params: set[nn.Parameter] | list[nn.Parameter]) -> None:
    """Make ``params`` (replicated plain tensors beside FSDP2's sharded ones) data-parallel: each time autograd
    accumulates a gradient into one of them, it is all-reduced and divided by the world size, as FSDP2's
    reduce-scatter averages the sharded gradients. Under gradient accumulation the reduction runs every micro-batch;
    the already averaged part is the same on every rank, so the result is still the mean of the summed gradients.
    The optimizer then applies the same update on every rank, so the copies stay equal."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world_size = dist.get_world_size()

    def all_reduce_mean(param: nn.Parameter) -> None:
        dist.all_reduce(param.grad)  # gloo has no AVG: sum, then divide
        param.grad.div_(world_size)

    for param in params:
        param.register_post_accumulate_grad_hook(all_reduce_mean)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# --- sharded checkpoints (FSDP) --------------------------------------------------------------------------


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any] | None = None) -> None:
    """Save model + optimizer state with ``torch.distributed.checkpoint`` into folder ``path`` (all ranks call it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, **(extra or {})}, checkpoint_id=str(path))


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_sharded` wrote, resharding to the current world size if it changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict on CPU; under FSDP every rank must call it, rank 0 gets the tensors."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "any_rank",
    "average_gradients_across_ranks",
    "barrier",
    "cleanup",
    "full_model_state_dict",
    "init_distributed",
    "is_fsdp",
    "load_sharded",
    "save_sharded",
    "transformer_blocks",
    "unwrap",
    "wrap_model",
]
