"""Scale planning: memory, FLOPs and step time of a training step on a named GPU, planned on a CPU with fake tensors."""

from .gpus import GPUS, get_gpu, parse_bytes
from .planner import PlanConfig, PlanReport, fit_batch, plan

__all__ = ["GPUS", "PlanConfig", "PlanReport", "fit_batch", "get_gpu", "parse_bytes", "plan"]
