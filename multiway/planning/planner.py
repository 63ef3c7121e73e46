"""Plan a training step before renting the GPU: memory per rank, FLOPs, step time and MFU, from PyTorch's own tools.

:func:`plan` builds the model of a preset and task under :class:`torch._subclasses.FakeTensorMode` (tensors carry
shapes and dtypes but no storage, so even the 1.9B giant costs no memory and seconds of CPU), optionally shards it
with FSDP2 over a fake process group of ``world_size`` ranks, and runs one real training step — forward, loss,
backward, AdamW update — under

* :class:`torch.distributed._tools.mem_tracker.MemTracker` (FSDP2: ``FSDPMemTracker``): every tensor's storage,
  by category (parameters, gradients, optimizer states, activations, temporaries), the peak and the module active
  at the peak;
* :class:`torch.utils.flop_counter.FlopCounterMode`: FLOPs of every matmul and attention kernel, backward and
  recomputation included;
* a roofline over the same ops (:class:`Roofline`): each op takes ``max(FLOPs / peak, bytes / bandwidth)`` on the
  chosen GPU, from which the step time and MFU follow.

The same step on real tensors (``fake=False``) is how the CI checks the planner against a measurement.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ..model.factory import create_model, split_model_name
from ..train.distributed import average_gradients_across_ranks
from .gpus import get_gpu, parse_bytes

Task = Literal["auto", "backbone", "pretraining", "vqav2", "retrieval", "imageclassification", "nlvr2", "dense"]
# task -> the task head suffix of the model it builds (None: the bare backbone)
_TASK_MODELS: dict[str, str | None] = {"backbone": None, "dense": None, "pretraining": "pretraining", "vqav2": "vqav2",
                                       "retrieval": "retrieval", "imageclassification": "imageclassification", "nlvr2": "nlvr2"}
# matmul efficiency and bandwidth efficiency assumed for the roofline (typical large-GEMM / elementwise-kernel
# fractions of the data-sheet peaks on H100-class GPUs; the GPU suite measures the real ones)
MATMUL_EFFICIENCY = 0.7
BANDWIDTH_EFFICIENCY = 0.8


@dataclass
class PlanConfig:
    """``multiway plan``: one training step of a model at a batch, resolution, precision and parallel strategy."""

    model: str = "beit3_base_patch16_224"  # a preset, or preset_task (beit3_large_patch16_480_vqav2)
    task: Task = "auto"  # auto: the model name's task suffix, else the backbone in fused mode
    batch: int = 8  # per rank; pretraining: per stream (text-only, image-only and image-text pairs each)
    img_size: int | None = None  # default: the preset's
    text_len: int = 64  # text tokens per sample
    precision: Literal["fp32", "bf16-autocast", "bf16"] = "bf16-autocast"
    ac: Literal["none", "selective", "full"] = "selective"  # what the blocks keep for backward (multiway/model/recompute.py)
    strategy: Literal["single", "ddp", "fsdp2"] = "single"
    world_size: int = 1
    gpu: Literal["h100", "h200", "a100"] = "h100"
    gpu_memory: str = ""  # memory per GPU for --fit-batch (80GB, 24GiB); default: the GPU's
    memory_margin: float = 0.1  # fraction of gpu_memory left for the CUDA context, allocator fragmentation, NCCL
    fit_batch: bool = False  # find the largest batch whose peak fits gpu_memory * (1 - memory_margin)
    codebook_size: int = 8192  # pretraining: visual-token vocabulary
    num_answers: int = 3129  # vqav2: answer vocabulary
    window_size: int = 14  # dense: ViTDet window attention (patches); 0 = global attention everywhere
    global_attention_interval: int = 3  # dense: every n-th block global (ViTDet base 3, large 6)

    def __post_init__(self) -> None:
        for name in ("batch", "text_len", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.strategy == "single" and self.world_size != 1:
            raise ValueError(f"strategy=single runs one rank; world_size={self.world_size} needs strategy ddp or fsdp2")
        if not 0 <= self.memory_margin < 1:
            raise ValueError(f"memory_margin={self.memory_margin}: expected a fraction in [0, 1)")
        split_model_name(self.model)  # a clear error for an unknown model now, not after building
        get_gpu(self.gpu)
        if self.gpu_memory:
            parse_bytes(self.gpu_memory)


@dataclass
class PlanReport:
    """What one planned (or measured) step costs per rank. Bytes, FLOPs and seconds."""

    config: dict
    task: str
    model_name: str
    params: int  # parameters of the whole model
    param_bytes: int  # per rank, steady state
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # saved for backward at the end of the forward pass
    peak_bytes_per_rank: int
    peak_phase: str  # forward / backward / optimizer
    peak_module: str  # the innermost module running when the peak was reached
    peak_breakdown: dict[str, int]  # the tracker's categories at the peak
    flops_per_step: int  # as executed: forward, backward and any recomputation
    model_flops_per_step: int  # without activation-checkpointing recomputation (what MFU counts)
    compute_seconds: float  # roofline of the step's ops on the GPU
    comm_seconds: float  # gradient all-reduce (DDP) or all-gather + reduce-scatter (FSDP2) over NVLink
    step_seconds: float  # max(compute, comm): communication assumed overlapped with compute
    mfu: float
    gpu: str
    samples_per_step: int
    plan_seconds: float  # wall time of the planning itself on this machine
    plan_cpu_seconds: float  # CPU time of this process for it (the wall time grows when the machine is shared)
    fake: bool = True
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Roofline(TorchDispatchMode):
    """Estimated GPU time of every op that passes through: ``max(FLOPs / (peak * e_m), bytes / (bw * e_b))``.

    FLOPs come from :data:`torch.utils.flop_counter.flop_registry` (matmuls, convolutions, attention kernels), bytes
    are the sizes of the op's tensor inputs and outputs (broadcast dimensions counted once). Views are free.
    """

    _FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "select", "slice",
             "split", "split_with_sizes", "as_strided", "detach", "alias", "unbind", "lift_fresh"}

    def __init__(self, gpu: str):
        super().__init__()
        self.gpu = get_gpu(gpu)
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (the dispatch protocol)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet.__name__ in self._FREE or func.namespace == "prim":  # views; fake mode's device queries
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        moved = sum(_touched_bytes(t) for t in inputs + outputs)
        seconds = moved / (self.gpu.hbm_gb_s * 1e9 * BANDWIDTH_EFFICIENCY)
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            dtype = next((t.dtype for t in outputs if t.is_floating_point()), torch.float32)
            peak = self.gpu.matmul_tflops.get(dtype, self.gpu.matmul_tflops[torch.float32]) * 1e12
            seconds = max(seconds, flops / (peak * MATMUL_EFFICIENCY))
        self.seconds += seconds
        return out


def _touched_bytes(t: Tensor) -> int:
    numel = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            numel *= size
    return numel * t.element_size()


class _ActivePeaks:
    """Mixin for PyTorch's memory trackers: the same per-module peak bookkeeping, visiting only the modules that
    are running (the stock tracker visits every module it has seen on every op: quadratic for the 40-layer giant)."""

    def _update_peak_stats(self, peak_state: Any) -> None:
        if len(self.memory_tracking) != getattr(self, "_indexed", -1):
            self._by_fqn: dict[str, list] = {}
            for stats in self.memory_tracking.values():
                self._by_fqn.setdefault(stats.mod_fqn, []).append(stats)
            self._indexed = len(self.memory_tracking)
        current = self._curr_mem_snap
        for fqn in self._mod_tracker.parents:
            for stats in self._by_fqn.get(fqn, ()):
                if peak_state in stats.snapshots:
                    for dev, snap in current.items():
                        if stats.local_peak.get(dev, 0) < snap["Total"]:
                            stats.local_peak[dev] = snap["Total"]
                            stats.snapshots[peak_state][-1][dev] = copy.deepcopy(snap)
        for dev, snap in current.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = copy.deepcopy(snap)


def _tracker(fsdp: bool, root: nn.Module, opt: torch.optim.Optimizer) -> Any:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    if fsdp:
        return type("FSDPTracker", (_ActivePeaks, FSDPMemTracker), {})(root, opt)
    tracker = type("Tracker", (_ActivePeaks, MemTracker), {})()
    tracker.track_external(root, opt)
    return tracker


# --- the steps ------------------------------------------------------------------------------------------------


def _dtype(cfg: PlanConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def _images(cfg: PlanConfig, model_cfg: Any, batch: int, generator: torch.Generator) -> Tensor:
    return torch.randn(batch, 3, model_cfg.img_size, model_cfg.img_size, generator=generator).to(_dtype(cfg))


def _ids(model_cfg: Any, batch: int, length: int, generator: torch.Generator) -> Tensor:
    return torch.randint(4, model_cfg.vocab_size, (batch, length), generator=generator)


def make_step(cfg: PlanConfig, task: str, model: nn.Module) -> tuple[Callable[[], Tensor], int]:
    """The forward + loss of one step of ``task`` on synthetic inputs made now, and the samples it holds.

    Inputs carry no padding and masks select fixed positions, so nothing depends on tensor values (fake tensors
    have none); the memory and FLOPs are those of the real batches of the same shapes.
    """
    mc = model.config
    g = torch.Generator().manual_seed(0)
    text_len = min(cfg.text_len, mc.max_text_positions - 2)
    b = cfg.batch
    if task == "backbone":
        image, ids = _images(cfg, mc, b, g), _ids(mc, b, text_len, g)
        return (lambda: model(image, ids).last_hidden_state.float().square().mean()), b
    if task == "dense":
        image = _images(cfg, mc, b, g)
        indices = [i for i in range(mc.depth) if (i + 1) % max(mc.depth // 4, 1) == 0][-4:]

        def dense() -> Tensor:  # the four maps a simple feature pyramid reads; detection heads not included
            maps = model.forward_intermediates(image, indices=indices, intermediates_only=True)
            return sum(m.float().square().mean() for m in maps)

        return dense, b
    if task == "vqav2":
        image, ids = _images(cfg, mc, b, g), _ids(mc, b, text_len, g)
        labels = torch.zeros(b, cfg.num_answers)
        labels[:, :3] = torch.tensor([1.0, 0.6, 0.3])

        def vqa() -> Tensor:  # the official loss: BCE summed over answers, averaged over questions
            logits = model(image, ids)
            return F.binary_cross_entropy_with_logits(logits.float(), labels) * labels.shape[1]

        return vqa, b
    if task == "retrieval":
        image, ids = _images(cfg, mc, b, g), _ids(mc, b, text_len, g)
        return (lambda: model(image, ids)[0]), b
    if task == "imageclassification":
        image, labels = _images(cfg, mc, b, g), torch.randint(0, 1000, (b,), generator=g)
        return (lambda: F.cross_entropy(model(image).float(), labels)), b
    if task == "nlvr2":
        a, c, ids = _images(cfg, mc, b, g), _images(cfg, mc, b, g), _ids(mc, b, text_len, g)
        labels = torch.randint(0, 2, (b,), generator=g)
        return (lambda: F.cross_entropy(model(a, c, ids).float(), labels)), b
    if task == "pretraining":
        return _pretraining_step(cfg, model, g, text_len), 3 * b
    raise ValueError(f"task {task!r}: expected one of {sorted(_TASK_MODELS)}")


def _pretraining_step(cfg: PlanConfig, model: nn.Module, g: torch.Generator, text_len: int) -> Callable[[], Tensor]:
    """Masked data modeling on the three streams (BEiT-3's mix): text 15% masked, image 40%, pairs' text 50%.

    The heads run on the masked tokens only, as :class:`multiway.BEiT3ForPretraining` does; here the masked tokens
    are the first ones of each row (a slice instead of a boolean gather: same sizes, no value dependence).
    """
    mc, b = model.config, cfg.batch
    n_img = mc.num_patches
    m_img, m_text, m_pair = round(0.4 * n_img), max(round(0.15 * text_len), 1), max(round(0.5 * text_len), 1)
    image_mask = torch.zeros(b, n_img, dtype=torch.bool)
    image_mask[:, :m_img] = True
    text_ids, pair_ids = _ids(mc, b, text_len, g), _ids(mc, b, text_len, g)
    image, pair_image = _images(cfg, mc, b, g), _images(cfg, mc, b, g)
    text_targets = torch.randint(0, mc.vocab_size, (b * m_text,), generator=g)
    pair_targets = torch.randint(0, mc.vocab_size, (b * m_pair,), generator=g)
    image_targets = torch.randint(0, cfg.codebook_size, (b * m_img,), generator=g)
    bb, dim = model.beit3, mc.embed_dim

    def step() -> Tensor:
        x = bb(text_ids=text_ids).last_hidden_state
        loss = F.cross_entropy(model.mlm_head(x[:, :m_text].reshape(-1, dim)).float(), text_targets)
        out = bb(image=image, image_masked_positions=image_mask)
        x = out.last_hidden_state
        loss = loss + F.cross_entropy(model.mim_head(x[:, 1 : 1 + m_img].reshape(-1, dim)).float(), image_targets)
        out = bb(pair_image, pair_ids)
        x = out.last_hidden_state[:, out.num_vision :]
        return loss + F.cross_entropy(model.mlm_head(x[:, :m_pair].reshape(-1, dim)).float(), pair_targets)

    return step


# --- building -------------------------------------------------------------------------------------------------


def resolve_task(cfg: PlanConfig) -> tuple[str, str]:
    """(task, model name to build) for ``cfg``: the model name's suffix decides unless ``task`` is given."""
    preset, suffix = split_model_name(cfg.model)
    if cfg.task != "auto":
        task = cfg.task
    elif suffix is None:
        task = "backbone"
    elif suffix in _TASK_MODELS.values():
        task = suffix
    else:
        raise ValueError(f"model {cfg.model!r}: the planner has no step for its task {suffix!r}; "
                         f"pass --task with one of {sorted(_TASK_MODELS)}")
    head = _TASK_MODELS[task]
    return task, preset if head is None else f"{preset}_{head}"


def _build(cfg: PlanConfig, name: str, task: str) -> nn.Module:
    kwargs: dict[str, Any] = {"grad_checkpointing": cfg.ac == "full", "recompute_norms": cfg.ac == "selective"}
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    if task == "pretraining":
        kwargs["codebook_size"] = cfg.codebook_size
    if task == "vqav2":
        kwargs["num_classes"] = cfg.num_answers
    if task == "dense":
        kwargs.update(window_size=cfg.window_size, global_attention_interval=cfg.global_attention_interval)
    # Build directly in the training dtype (a later .to() cannot swap fake parameters).
    default = torch.get_default_dtype()
    torch.set_default_dtype(_dtype(cfg))
    try:
        return create_model(name, **kwargs).train()
    finally:
        torch.set_default_dtype(default)


class _Step(nn.Module):
    """The step's forward and loss as one root module call, as the trackers (and FSDP2's root) expect: a task
    that calls the backbone several times (pretraining's three streams) then makes submodule calls only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn: Callable[[], Tensor] | None = None

    def forward(self) -> Tensor:
        return self.loss_fn()


def _fake_process_group(world_size: int) -> Any:
    """A fake process group of ``world_size`` ranks (this process is rank 0) and its 1-D CPU device mesh; the
    caller destroys the group (:func:`torch.distributed.destroy_process_group`) when done."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner makes its own fake process group: run it outside a distributed job (not under torchrun)")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    return init_device_mesh("cpu", (world_size,))


def _shard(root: _Step, mesh: Any, precision: str) -> None:
    """FSDP2 as the training loop applies it: one group per block, the rest (embeddings, heads) in the root; with
    bf16 autocast the parameters are gathered in bf16 and gradients reduced in fp32 (its mixed-precision policy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = precision == "bf16-autocast"
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()

    model = root.model
    # 0-dim parameters (logit_scale) stay replicated with averaged gradients, as the training loop keeps them
    scalars = {p for p in root.parameters() if p.ndim == 0}
    for layer in _blocks(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(root, mesh=mesh, mp_policy=mp_policy, ignored_params=scalars or None)
    average_gradients_across_ranks(scalars)


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.beit3.encoder.layers if hasattr(model, "beit3") else model.encoder.layers


@contextlib.contextmanager
def _collect_garbage_at_block_boundaries(model: nn.Module) -> Iterator[None]:
    """Free reference cycles at fixed points of the step instead of whenever Python's collector happens to run.

    The memory trackers' module hooks put some autograd nodes into reference cycles (``ModTracker``'s grad hooks),
    so the tensors those nodes hold are freed by the cyclic garbage collector, not by reference counting, and the
    automatic collector runs after a count of object allocations that depends on everything the process did
    before: two plans of one configuration then differed by ~1-2% in peak. Here the automatic collector is off
    for the step, and a collection runs before and after every Transformer block's forward; the objects that
    existed before the step are frozen (``gc.freeze``) so that each collection scans only the step's own objects.
    """
    gc.collect()
    # freeze only when nothing else has: gc.unfreeze() would also release a caller's frozen objects
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    was_enabled = gc.isenabled()
    gc.disable()

    def collect(*_: Any) -> None:
        gc.collect()

    handles = [h for block in _blocks(model) for h in (block.register_forward_pre_hook(collect), block.register_forward_hook(collect))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if was_enabled:
            gc.enable()
        if freeze:
            gc.unfreeze()


def _local_bytes(tensors: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _innermost_module_at_peak(tracker: Any, peak: int, type_name: str) -> str:
    device = torch.device("cpu")
    at_peak = [s.mod_fqn for s in tracker.memory_tracking.values() if s.local_peak.get(device, 0) >= peak]
    name = max(at_peak, key=lambda name: name.count("."), default="(outside any module)")
    return re.sub(r"^(FSDP)?_Step(\.model)?\.?", "", name) or type_name


# --- the plan -------------------------------------------------------------------------------------------------


def plan(cfg: PlanConfig, fake: bool = True) -> PlanReport:
    """Run one training step of ``cfg`` under the trackers and report its cost per rank (see the module docstring).

    ``fake=False`` runs the same step on real CPU tensors (tiny models only): the measurement the planner is
    checked against.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    started, cpu_started = time.perf_counter(), time.process_time()
    task, name = resolve_task(cfg)
    fsdp = cfg.strategy == "fsdp2"
    mesh = _fake_process_group(cfg.world_size) if fsdp else None  # made outside fake mode: it reads real tensors
    mode = FakeTensorMode() if fake else None
    if mode is not None:
        mode.__enter__()
    try:
        torch.manual_seed(0)
        model = _build(cfg, name, task)
        params = sum(p.numel() for p in model.parameters())
        root = _Step(model)
        if fsdp:
            _shard(root, mesh, cfg.precision)
        # Fused AdamW as the training loop uses on one GPU; FSDP2's DTensors take the per-parameter loop.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"foreach": False} if fsdp else {"fused": True}))
        # Optimizer states exist from the first step on: create them before tracking (zero gradients, one update).
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        root.loss_fn, samples = make_step(cfg, task, model)
        param_bytes = _local_bytes(model.parameters())
        optimizer_bytes = _local_bytes(t for s in opt.state.values() for k, t in s.items() if isinstance(t, Tensor) and k != "step")
        grad_bytes = _local_bytes(p for p in model.parameters() if p.requires_grad)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16-autocast")
        tracker = _tracker(fsdp, root, opt)
        flops, roofline = FlopCounterMode(display=False), Roofline(cfg.gpu)
        peaks: dict[str, int] = {}
        with _collect_garbage_at_block_boundaries(model), tracker, flops, roofline:
            with autocast:
                loss = root()
            forward_flops = flops.get_total_flops()
            activation_bytes = int(tracker.get_tracker_snapshot("current")[torch.device("cpu")].get(_activation_key(tracker), 0))
            peaks["forward"] = _peak(tracker)
            loss.backward()
            peaks["backward"] = _peak(tracker)
            opt.step()
            opt.zero_grad(set_to_none=True)
            peaks["optimizer"] = _peak(tracker)
        peak = peaks["optimizer"]
        snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        breakdown = {str(getattr(k, "value", k)): int(v) for k, v in snapshot.items()}
        peak_module = _innermost_module_at_peak(tracker, peak, type(model).__name__)
    finally:
        if mode is not None:
            mode.__exit__(None, None, None)
        if mesh is not None:
            dist.destroy_process_group()
    notes = []
    if cfg.strategy == "ddp":
        # DDP (gradient_as_bucket_view=False, the default) keeps a flat copy of the gradients in its buckets.
        peak += grad_bytes
        breakdown["DDP buckets"] = grad_bytes
        notes.append("ddp: the gradient buckets (one more copy of the gradients) are added analytically")
    total_flops = flops.get_total_flops()
    # Full checkpointing reruns each block's forward in backward; MFU counts the model's FLOPs without it.
    model_flops = total_flops - forward_flops if cfg.ac == "full" else total_flops
    gpu = get_gpu(cfg.gpu)
    comm = _comm_seconds(cfg, params, gpu.link_gb_s)
    step_seconds = max(roofline.seconds, comm)
    peak_tflops = gpu.matmul_tflops[torch.float32 if cfg.precision == "fp32" else torch.bfloat16]
    phase = next(p for p in ("forward", "backward", "optimizer") if peaks[p] >= peaks["optimizer"])
    return PlanReport(
        config=dataclasses.asdict(cfg), task=task, model_name=name, params=params, param_bytes=param_bytes,
        grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes, activation_bytes=activation_bytes,
        peak_bytes_per_rank=int(peak), peak_phase=phase, peak_module=peak_module, peak_breakdown=breakdown,
        flops_per_step=int(total_flops), model_flops_per_step=int(model_flops), compute_seconds=roofline.seconds,
        comm_seconds=comm, step_seconds=step_seconds, mfu=model_flops / (step_seconds * peak_tflops * 1e12),
        gpu=gpu.name, samples_per_step=samples, plan_seconds=time.perf_counter() - started,
        plan_cpu_seconds=time.process_time() - cpu_started, fake=fake, notes=notes,
    )


def _activation_key(tracker: Any) -> Any:
    snap = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
    return next(k for k in snap if str(getattr(k, "value", k)) == "Activation")


def _peak(tracker: Any) -> int:
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def _comm_seconds(cfg: PlanConfig, params: int, link_gb_s: float) -> float:
    """Ring-collective time per step: DDP all-reduces the gradients (2 (N-1)/N of their bytes per rank); FSDP2
    all-gathers the parameters in forward and again in backward and reduce-scatters the gradients (3 (N-1)/N)."""
    n = cfg.world_size
    if n == 1:
        return 0.0
    wire_bytes = 2 if cfg.precision != "fp32" and cfg.strategy == "fsdp2" else 4  # FSDP2 gathers bf16 params when asked
    factor = {"ddp": 2.0, "fsdp2": 3.0}.get(cfg.strategy, 0.0)
    return factor * (n - 1) / n * params * wire_bytes / (link_gb_s * 1e9)


def fit_batch(cfg: PlanConfig, budget_bytes: int | None = None, max_plans: int = 8) -> tuple[int, PlanReport]:
    """The largest batch whose planned peak fits ``budget_bytes`` (default: the GPU's memory less the margin).

    Peak memory grows about linearly with the batch: plans at batch 1 and 2 give a first line, each further plan
    (at the line's prediction) replaces the older point (secant steps), and the search ends between the largest
    batch that fits and the smallest that does not once they are adjacent, or after ``max_plans`` plans.
    """
    gpu = get_gpu(cfg.gpu)
    total = parse_bytes(cfg.gpu_memory) if cfg.gpu_memory else gpu.memory_bytes
    budget = budget_bytes if budget_bytes is not None else int(total * (1 - cfg.memory_margin))
    reports: dict[int, PlanReport] = {}

    def at(batch: int) -> PlanReport:
        if batch not in reports:
            reports[batch] = plan(dataclasses.replace(cfg, batch=batch, fit_batch=False))
        return reports[batch]

    if at(1).peak_bytes_per_rank > budget:
        raise ValueError(f"{cfg.model}: even batch 1 needs {at(1).peak_bytes_per_rank / 2**30:.1f} GiB per rank, more than "
                         f"the {budget / 2**30:.1f} GiB budget; try --ac full, --strategy fsdp2 or a bigger GPU")
    a, b = 1, 2
    while len(reports) < max_plans:
        pa, pb = at(a).peak_bytes_per_rank, at(b).peak_bytes_per_rank
        fits = [n for n, r in reports.items() if r.peak_bytes_per_rank <= budget]
        over = [n for n, r in reports.items() if r.peak_bytes_per_rank > budget]
        lo, hi = max(fits), min(over, default=None)
        if hi is not None and hi == lo + 1:
            break
        slope = max((pb - pa) / (b - a), 1.0)
        guess = math.floor(b + (budget - pb) / slope)
        guess = max(lo + 1, guess if hi is None else min(guess, hi - 1))
        if guess in reports:
            guess = lo + 1 if lo + 1 not in reports else guess
            if guess in reports:
                break
        a, b = b, guess
        at(b)
    best = max(n for n, r in reports.items() if r.peak_bytes_per_rank <= budget)
    return best, reports[best]
