"""``multiway plan``: memory, FLOPs, step time and MFU of one training step, planned on this CPU with fake tensors."""

from __future__ import annotations

import argparse
import json

from ..config import add_config_arguments, config_from_args
from .planner import PlanConfig, PlanReport, fit_batch, plan

# flag -> PlanConfig field (the flags are shorthands; key=value overrides and --config reach every field)
_FLAGS = {
    "model": str, "task": str, "batch": int, "img_size": int, "text_len": int, "precision": str, "ac": str, "strategy": str,
    "world_size": int, "gpu": str, "gpu_memory": str,
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan a training step: memory per rank, FLOPs, step time and MFU on a named GPU (fake tensors, no GPU)",
        description="Builds the model under fake tensors (no allocation), shards it with FSDP2 over a fake process "
        "group when asked, runs one training step (forward, loss, backward, AdamW) under PyTorch's MemTracker, "
        "FlopCounterMode and a roofline of the chosen GPU, and reports the cost per rank. Example: multiway plan "
        "--model beit3_large_patch16_480_vqav2 --batch 32 --precision bf16-autocast --gpu h100",
    )
    for flag, kind in _FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None, help=f"sets {flag}= (PlanConfig)")
    p.add_argument("--fit-batch", dest="fit_batch", action="store_const", const=True, default=None,
                   help="find the largest batch that fits --gpu-memory (default: the GPU's) less memory_margin")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_config_arguments(p, "a YAML file of PlanConfig keys")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    updates = {k: getattr(args, k) for k in [*_FLAGS, "fit_batch"] if getattr(args, k) is not None}
    cfg = config_from_args(PlanConfig, args, updates=updates)
    report = fit_batch(cfg)[1] if cfg.fit_batch else plan(cfg)
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def format_report(r: PlanReport) -> str:
    """The report as a two-column table."""
    c = r.config
    rows = [
        ("model", f"{r.model_name} ({r.params / 1e6:.1f}M parameters), task {r.task}"),
        ("step", f"batch {c['batch']} per rank ({r.samples_per_step} samples), {c['precision']}, activation recompute "
                 f"{c['ac']}, {c['strategy']} x {c['world_size']}"),
        ("parameters", _gib(r.param_bytes)),
        ("gradients", _gib(r.grad_bytes)),
        ("optimizer states", _gib(r.optimizer_bytes)),
        ("activations (saved)", _gib(r.activation_bytes)),
        ("peak per rank", f"{_gib(r.peak_bytes_per_rank)} in {r.peak_phase}, inside {r.peak_module}"),
        ("peak breakdown", ", ".join(f"{k} {_gib(v)}" for k, v in r.peak_breakdown.items() if v and k != "Total")),
        ("FLOPs per step", f"{r.flops_per_step / 1e12:.2f} TFLOP (model FLOPs {r.model_flops_per_step / 1e12:.2f})"),
        (f"on {r.gpu}", f"step {r.step_seconds * 1e3:.1f} ms (compute {r.compute_seconds * 1e3:.1f}, "
                        f"communication {r.comm_seconds * 1e3:.1f}), {r.samples_per_step / r.step_seconds:.1f} samples/s, "
                        f"MFU {100 * r.mfu:.0f}%"),
        ("planned in", f"{r.plan_seconds:.1f} s ({r.plan_cpu_seconds:.1f} s CPU)"),
    ]
    rows += [("note", n) for n in r.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
