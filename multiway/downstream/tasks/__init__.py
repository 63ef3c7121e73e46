"""The downstream tasks: one module per task, one registry line per official task name.

>>> task = get_task("vqav2")()                      # the task with its default options
>>> train = task.build_dataset("train", DataSettings("data/vqa", tokenizer=tok, img_size=480))
>>> model = task.build_model("beit3_base_patch16_480", task.num_classes(train))
>>> loss, logs = task.loss(model, task.collate([train[0], train[1]]))

To add a task: write ``<name>.py`` with one :class:`DownstreamTask` subclass (see :mod:`.base` for the contract)
and add one line to :data:`TASKS` below.

One registry serves both model families: :data:`TASKS` holds the BEiT-3 class of each official task name,
:data:`FAMILY_TASKS` the classes of another family (METER) under the same names. ``get_task(name, family)`` picks
one; :func:`model_family` tells the family of a preset, so ``multiway finetune vqav2 model.preset=meter_...``
trains METER's VQA through the same loop.
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


#: model families: "beit3" (multiway.create_model presets and files), "meter" (multiway.meter presets and files)
FAMILIES = ("beit3", "meter")

# (official task name, family) -> "module:Class" of the family's task. METER's classes are imported on first use:
# they subclass the BEiT-3 tasks of their data (this package), and their encoders need the meter extra.
FAMILY_TASKS: dict[tuple[str, str], str] = {
    ("vqav2", "meter"): "multiway.meter.tasks:METERVQA",
    ("nlvr2", "meter"): "multiway.meter.tasks:METERNLVR2",
    ("coco_retrieval", "meter"): "multiway.meter.tasks:METERRetrieval",
    ("coco_captioning", "meter"): "multiway.meter.tasks:METERCaptioning",
    ("snli_ve", "meter"): "multiway.meter.snli_ve:SNLIVE",
}


def task_names(family: str | None = None) -> list[str]:
    """The official task names of ``family`` (None: of every family), in registry order."""
    beit3 = list(TASKS) if family in (None, "beit3") else []
    others = [name for name, fam in FAMILY_TASKS if family in (None, fam)]
    return list(dict.fromkeys(beit3 + others))


def get_task(name: str, family: str = "beit3") -> type[DownstreamTask]:
    """The class of the task called ``name`` (an official name) for models of ``family`` (see :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; families: {', '.join(FAMILIES)}")
    if family == "beit3" and name in TASKS:
        return TASKS[name]
    if (name, family) not in FAMILY_TASKS:
        raise KeyError(f"unknown task {name!r} for {family} models; valid tasks: {', '.join(task_names(family))}")
    import importlib

    module, cls = FAMILY_TASKS[name, family].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{family} tasks need an optional package ({e.name}): pip install 'multiway[{family}]'",
                                  name=e.name) from e


def model_family(preset: str) -> str:
    """The family of the model preset ``preset``: ``"beit3"`` (``multiway.PRESETS``, a task suffix allowed) or
    ``"meter"`` (``multiway.meter.PRESETS``)."""
    from ...meter.config import PRESETS as METER_PRESETS
    from ...model.config import PRESETS

    if preset in METER_PRESETS:
        return "meter"
    if preset in PRESETS or any(preset.startswith(f"{p}_") for p in PRESETS):
        return "beit3"
    raise KeyError(f"unknown model preset {preset!r}; BEiT-3 presets: {', '.join(PRESETS)}; METER presets: {', '.join(METER_PRESETS)}")


def model_file_family(path: str) -> str:
    """The family of a model file: ``"meter"`` for a multiway METER ``.safetensors`` (``meter_config`` in its
    header), ``"beit3"`` for every other file."""
    from pathlib import Path

    from ...model.checkpoints import read_safetensors_header

    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return "beit3"
    return "meter" if "meter_config" in read_safetensors_header(path)[1] else "beit3"


def task_for_head(head: str) -> type[DownstreamTask]:
    """The first registered task whose model has the head ``head`` (a model-registry suffix such as ``vqav2``)."""
    for cls in TASKS.values():
        if cls.head == head:
            return cls
    raise KeyError(f"no task builds a {head!r} model; heads of the tasks: {', '.join(sorted({c.head for c in TASKS.values()}))}")


__all__ = [
    "FAMILIES", "FAMILY_TASKS", "TASKS", "DataSettings", "DownstreamTask", "EvalSettings", "NoOptions", "PredictCommand", "TaskTrainer",
    "get_task", "model_family", "model_file_family", "task_for_head", "task_names",
]
