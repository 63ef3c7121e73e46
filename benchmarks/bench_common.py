"""What the step benchmarks share (imported as a sibling module: run them as ``python benchmarks/X.py``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def seconds_per_call(fn: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Mean wall seconds of ``fn()`` over ``steps`` calls after ``warmup`` calls, CUDA work included."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every step benchmark takes: --steps, --warmup, --device, --grad-checkpointing, --compile."""
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true")
