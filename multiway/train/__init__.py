"""Training: the one loop (pretraining, fine-tuning, METER), optimiser groups, MDM objectives, distributed."""

from .checkpointing import CheckpointSaveError, CorruptCheckpointError, checkpoint_dirs, latest_checkpoint
from .config import TrainConfig
from .loop import NonFiniteLossError, train
from .metrics_log import read_metrics
from .objectives import masked_ce, mdm_loss
from .optim import LRSchedule, build_param_groups, cosine_lr, linear_lr, param_groups
from .task import MapDatasetTask, SampleLoadError, TrainTask

__all__ = [
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "LRSchedule",
    "linear_lr",
    "MapDatasetTask",
    "NonFiniteLossError",
    "SampleLoadError",
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
