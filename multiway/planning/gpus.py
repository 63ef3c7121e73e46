"""Peak numbers of the GPUs the planner can target (dense, no sparsity; SXM parts; NVIDIA data sheets).

``matmul_tflops`` holds the tensor-core peak per dtype that multiway's matmuls run in: bf16 (autocast or pure bf16)
and fp32. PyTorch runs fp32 matmuls without TF32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set, so fp32
uses the plain FP32 peak. ``link_gb_s`` is the NVLink bandwidth per GPU and direction inside one node (what NCCL's
ring all-reduce / all-gather / reduce-scatter approach at large messages); across nodes it is lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPU:
    name: str
    matmul_tflops: dict[torch.dtype, float]
    hbm_gb_s: float  # DRAM bandwidth, GB/s
    memory_bytes: int  # total memory as nvidia-smi reports it
    link_gb_s: float  # NVLink per GPU and direction, GB/s


GPUS: dict[str, GPU] = {
    "h100": GPU("NVIDIA H100 SXM 80GB", {torch.bfloat16: 989.0, torch.float32: 67.0}, 3350.0, 81559 * 2**20, 450.0),
    "h200": GPU("NVIDIA H200 SXM 141GB", {torch.bfloat16: 989.0, torch.float32: 67.0}, 4800.0, 143771 * 2**20, 450.0),
    "a100": GPU("NVIDIA A100 SXM 80GB", {torch.bfloat16: 312.0, torch.float32: 19.5}, 2039.0, 81920 * 2**20, 300.0),
}


def get_gpu(name: str) -> GPU:
    """The entry for ``name`` (case-insensitive: h100, h200, a100)."""
    key = name.lower()
    if key not in GPUS:
        raise KeyError(f"unknown gpu {name!r}; expected one of {sorted(GPUS)}")
    return GPUS[key]


def parse_bytes(text: str) -> int:
    """``"80GB"`` -> 80e9, ``"24GiB"`` -> 24 * 2**30, ``"1.5TB"``, ``"500MiB"``; a bare number is bytes."""
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "kib": 2**10, "tb": 10**12, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}
    value = text.strip().lower().replace(" ", "")
    unit = next((u for u in units if value.endswith(u)), "")
    number, scale = value[: len(value) - len(unit)], units.get(unit, 1)
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"memory size {text!r}: expected a number with a unit such as 80GB, 24GiB or 500MiB") from None
    if amount <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(amount * scale)
