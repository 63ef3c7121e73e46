"""``TrainConfig``: the settings of the one training loop (optimisation, precision, parallelism, logging, checkpoints).

Every field can be set in YAML or as a ``train.<field>=value`` override (see :mod:`multiway.config`); model and data
settings live in the configs that hold a ``TrainConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..config import check_literals, from_dict, to_dict


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing settings of :func:`train` (model/data settings live elsewhere)."""

    out_dir: str  # the run folder: train_config.yaml, metrics.csv, tb/, checkpoints/
    max_steps: int  # optimizer steps (the lr schedule's length)
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 1e-6  # the schedule's floor
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps
    weight_decay: float = 0.05  # AdamW, on the parameters multiway.train.optim does not exempt
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW
    eps: float = 1e-6  # AdamW
    layer_decay: float = 1.0  # layer-wise lr decay: layer k of L gets layer_decay ** (L + 1 - k)
    head_lr_scale: float = 1.0  # lr factor of the parameters outside the backbone
    grad_clip: float | None = 3.0  # max gradient norm; None or 0 = no clipping (the norm is still checked)
    accum_steps: int = 1  # micro-batches per optimizer step
    # autocast dtype: "auto" = bf16 on CUDA, fp32 on CPU; "fp16" adds a GradScaler; "fp32" disables autocast
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"  # data parallel, or FSDP2 fully_shard per block
    log_every: int = 10  # steps between metrics.csv rows
    save_every: int = 200  # steps between checkpoints (0 = only the final one)
    keep_last: int = 3  # checkpoints kept (0 = all)
    seed: int = 0  # seeds the RNGs, the data order and the augmentation
    max_bad_steps: int = 10  # consecutive non-finite losses before stopping
    eval_every: int = 0  # steps between task.evaluate calls (0 = only at the end)
    schedule: Literal["cosine", "linear"] = "cosine"  # decay after the linear warmup, down to min_lr
    progress: bool = True  # a progress bar on rank 0 (multiway.log.progress: a line every 30 s in a log file)
    compile: bool = False  # torch.compile the model (GPU runs)
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step
    # stop after this many minutes of training (then the final evaluation and checkpoint), even before max_steps;
    # the lr schedule still runs over max_steps
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.max_steps <= 0:
            raise ValueError(f"TrainConfig.max_steps must be > 0, got {self.max_steps}")
        if self.accum_steps < 1:
            raise ValueError(f"TrainConfig.accum_steps must be >= 1, got {self.accum_steps}")
        check_literals(self, "TrainConfig")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, d)
