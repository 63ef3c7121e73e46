"""Training: the one loop (pretraining, fine-tuning, METER), optimiser groups, MDM objectives, distributed."""

from .loop import (
    MapDatasetTask,
    NonFiniteLossError,
    TrainConfig,
    TrainTask,
    checkpoint_dirs,
    latest_checkpoint,
    read_metrics,
    train,
)
from .objectives import masked_ce, mdm_loss
from .optim import LRSchedule, build_param_groups, cosine_lr, linear_lr, param_groups

__all__ = [
    "LRSchedule",
    "linear_lr",
    "MapDatasetTask",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainTask",
    "build_param_groups",
    "checkpoint_dirs",
    "cosine_lr",
    "latest_checkpoint",
    "masked_ce",
    "mdm_loss",
    "param_groups",
    "read_metrics",
    "train",
]
