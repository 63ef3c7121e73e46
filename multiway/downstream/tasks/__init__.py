"""The downstream tasks: one module per task, one registry line per official task name.

>>> task = get_task("vqav2")()                      # the task with its default options
>>> train = task.build_dataset("train", DataSettings("data/vqa", tokenizer=tok, img_size=480))
>>> model = task.build_model("beit3_base_patch16_480", task.num_classes(train))
>>> loss, logs = task.loss(model, task.collate([train[0], train[1]]))

To add a task: write ``<name>.py`` with one :class:`DownstreamTask` subclass (see :mod:`.base` for the contract)
and add one line to :data:`TASKS` below.
"""

from __future__ import annotations

from .ade20k import ADE20K
from .base import DataSettings, DownstreamTask, EvalSettings, NoOptions, PredictCommand, TaskTrainer
from .captioning import CocoCaptioning, NoCaps
from .coco_detection import CocoDetection, CocoInstanceSegmentation
from .conll import Conll
from .imagenet import ImageNet
from .nlvr2 import NLVR2
from .retrieval import CocoRetrieval, Flickr30k
from .text_classification import TextClassification
from .vqav2 import VQAv2

# official task name -> its class
TASKS: dict[str, type[DownstreamTask]] = {
    "imagenet": ImageNet,
    "vqav2": VQAv2,
    "nlvr2": NLVR2,
    "coco_retrieval": CocoRetrieval,
    "flickr30k": Flickr30k,
    "coco_captioning": CocoCaptioning,
    "nocaps": NoCaps,
    "text_classification": TextClassification,
    "coco_detection": CocoDetection,
    "coco_instance_segmentation": CocoInstanceSegmentation,
    "ade20k": ADE20K,
    "conll": Conll,
}


def get_task(name: str) -> type[DownstreamTask]:
    """The class of the task called ``name`` (an official name, a key of :data:`TASKS`)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def task_for_head(head: str) -> type[DownstreamTask]:
    """The first registered task whose model has the head ``head`` (a model-registry suffix such as ``vqav2``)."""
    for cls in TASKS.values():
        if cls.head == head:
            return cls
    raise KeyError(f"no task builds a {head!r} model; heads of the tasks: {', '.join(sorted({c.head for c in TASKS.values()}))}")


__all__ = [
    "TASKS", "DataSettings", "DownstreamTask", "EvalSettings", "NoOptions", "PredictCommand", "TaskTrainer", "get_task",
    "task_for_head",
]
