"""The contract every downstream task implements: :class:`DownstreamTask`.

A task is one class in one module of :mod:`multiway.downstream.tasks` and one line in its registry. The class owns
everything specific to the task, so fine-tuning, evaluation, prediction, the quickstart and the METER study are
written once, against this contract, and never ask which task they run:

============================  ==============================================================================
what                          where in the class
============================  ==============================================================================
identity                      ``name`` (official name, registry key), ``head`` (model-registry suffix of the
                              head), ``metric`` / ``metric_label`` (headline number), ``normalize``
its settings                  ``Options`` (a dataclass of the task's own fields; ``options.*`` in a config)
data                          ``splits`` (official index files), :meth:`build_dataset`, :meth:`collate`,
                              :meth:`num_classes` and :meth:`label_names` read from the training data
model                         :meth:`build_model` (the head, sized from the data), :meth:`load_init`
training                      :meth:`loss` (forward + the official loss on one batch), ``find_unused_parameters``
evaluation                    :meth:`evaluate` (the standard metric over a dataset; prediction files under
                              ``out_dir``)
baselines                     :meth:`chance_level` (the table's chance column), :meth:`baselines` (more trivial
                              predictors, by name)
prediction on user files      ``predict_commands`` (``multiway predict <command>``), :meth:`metadata` (what
                              ``task.json`` keeps for inference)
recipe                        ``recipe`` (the ``configs/`` file of the official settings)
============================  ==============================================================================

Batches are dicts of tensors: what :meth:`collate` makes of what the datasets return. Shapes use B (batch),
T (text length with specials), S (image side), C (classes).
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ...data.index_dataset import collate_batch
from ...train import MapDatasetTask


@dataclass
class DataSettings:
    """How a task's datasets are read; the same for every task (a task ignores what it does not use).

    data_dir: the folder of the index files (image paths inside them are relative to it).
    tokenizer: a :class:`multiway.tokenizers.TextTokenizer`; needed for texts given as strings.
    max_text_len: text length with ``<s>``/``</s>`` (official ``num_max_bpe_tokens``).
    img_size: side S of the (3, S, S) images the model takes.
    crop_scale / hflip / randaug: training augmentation (RandomResizedCrop area range, flips, RandAugment).
    on_error: broken index lines and images raise (``"raise"``) or are skipped and counted (``"skip"``).
    labels: class names by id fixed by the training split (from :meth:`DownstreamTask.label_names`), so every
        other split numbers its classes the same way; None lets the split define them.
    """

    data_dir: str
    tokenizer: Any = None
    max_text_len: int = 64
    img_size: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    randaug: bool = False
    on_error: Literal["raise", "skip"] = "raise"
    labels: list[str] | None = None


@dataclass
class EvalSettings:
    """How :meth:`DownstreamTask.evaluate` runs.

    batch_size / num_workers: of the evaluation DataLoader.
    out_dir: where the task writes prediction files (VQA submission for unlabelled splits, generated captions);
        None writes none.
    split: the split's name, for those file names.
    """

    batch_size: int = 64
    num_workers: int = 0
    out_dir: str | None = None
    split: str = "val"


@dataclass
class NoOptions:
    """A task without settings of its own."""


@dataclass(frozen=True)
class PredictCommand:
    """One ``multiway predict <name>`` sub-command a task offers on the user's files.

    add_arguments(parser): adds the command's own arguments (``--model``, ``--tokenizer`` and ``--json`` are
    common to all). run(args, predictor) -> exit code: prints the results (rows, errors on stderr).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Any], int]


class DownstreamTask(abc.ABC):
    """Base class of a downstream task (see the module docstring for the map of what goes where).

    A subclass sets the class attributes and implements :meth:`build_dataset`, :meth:`loss`, :meth:`evaluate`
    and :meth:`chance_level`; the other methods have defaults that fit most tasks. An instance holds the task's
    options only: every method takes what it works on as arguments, so one instance serves any number of
    datasets and models.

    Args:
        options: the task's :attr:`Options` (an instance, a mapping of its fields, or None for the defaults).
    """

    #: official task name (the registry key)
    name: ClassVar[str] = ""
    #: task suffix of the model registry: the head is ``create_model(f"{preset}_{head}")``
    head: ClassVar[str] = ""
    #: key of :meth:`evaluate`'s result that tables report, and its label
    metric: ClassVar[str] = ""
    metric_label: ClassVar[str] = ""
    #: image normalisation of the task's transforms: "vl" (mean = std = 0.5) or "imagenet"
    normalize: ClassVar[Literal["vl", "imagenet"]] = "vl"
    #: index files per split, relative to ``data_dir`` (a split reads every file listed that exists)
    splits: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: the task's own settings (a dataclass; fields documented there)
    Options: ClassVar[type] = NoOptions
    #: the official recipe, a file of ``configs/``
    recipe: ClassVar[str] = ""
    #: DDP: some parameters get no gradient in some steps (one modality's experts unused)
    find_unused_parameters: ClassVar[bool] = False
    #: the metric also means something with each example beside another example's image(s) (see OtherImages):
    #: the gap shows how much the model reads the image
    image_blind_check: ClassVar[bool] = False
    #: the pretraining checkpoint already holds this head (its contrastive heads): a zero-shot score is meaningful
    zero_shot_from_pretraining: ClassVar[bool] = False
    #: ``multiway predict`` sub-commands offered on user files
    predict_commands: ClassVar[tuple[PredictCommand, ...]] = ()
    #: the family of the task's models (``FAMILIES`` of :mod:`multiway.downstream.tasks`): how they are built from a
    #: preset, saved and loaded (:meth:`model_source`, :meth:`save_model`, :meth:`load_model`)
    family: ClassVar[str] = "beit3"

    def __init__(self, options: Any = None) -> None:
        self.options = self.make_options(options)

    @classmethod
    def make_options(cls, options: Any = None, where: str = "options") -> Any:
        """The task's :attr:`Options` from an instance, a mapping of its fields (unknown keys name the valid
        ones; ``where`` is their path in the whole config), or None (the defaults)."""
        if options is None:
            return cls.Options()
        if isinstance(options, cls.Options):
            return options
        if isinstance(options, Mapping):
            from ...config import from_dict

            return from_dict(cls.Options, dict(options), where=where)
        raise TypeError(f"{cls.name} options: expected {cls.Options.__name__}, a mapping of its fields or None; "
                        f"got {type(options).__name__}")

    # --- data --------------------------------------------------------------------------------------------

    def index_files(self, split: str) -> tuple[str, ...]:
        """The official index file names of ``split``."""
        if split not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {split!r}; its splits: {', '.join(self.splits)}")
        return self.splits[split]

    @abc.abstractmethod
    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        """The dataset of ``split`` (``"train"`` gets the training augmentation): items are dicts that
        :meth:`collate` stacks into batches."""

    def collate(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        """Stack dataset items into a batch (default :func:`collate_batch`: tensors stacked, ints to long,
        floats to float; skipped items dropped and listed under ``batch["skipped"]``)."""
        return collate_batch(items)

    def eval_transform(self, img_size: int) -> Callable:
        """PIL image -> (3, S, S) tensor for evaluation and prediction (default: the vision-language squash-resize
        to S x S with mean = std = 0.5)."""
        from ...data.transforms import build_transform

        return build_transform("", is_train=False, img_size=img_size)

    def image_transform(self, split: str, data: DataSettings) -> Callable:
        """The images of ``split``: for ``"train"`` the vision-language training views (RandomResizedCrop of
        ``data.crop_scale``, flips unless ``data.hflip`` is off, RandAugment with ``data.randaug``), else
        :meth:`eval_transform`."""
        from ...data.transforms import build_transform

        if split != "train":
            return self.eval_transform(data.img_size)
        return build_transform("", is_train=True, img_size=data.img_size, randaug=data.randaug, crop_scale=data.crop_scale,
                               hflip=data.hflip)

    def num_classes(self, train_set: Dataset) -> int | None:
        """Size C of the head's output read from the training data; None for heads without classes."""
        return None

    def label_names(self, train_set: Dataset) -> list[str] | None:
        """Class names by id (saved in ``task.json`` for prediction; fixes the class order of other splits)."""
        return None

    # --- model -------------------------------------------------------------------------------------------

    def build_model(self, source: Any, num_classes: int | None = None) -> nn.Module:
        """The task's model with a fresh head of ``num_classes`` outputs.

        source: what the model family builds from; for BEiT-3 a preset name (``"beit3_base_patch16_224"``) or a
        mapping ``{"preset": name, **MultiwayConfig field overrides}``. METER's tasks take the pretrained
        ``METER`` module the head goes on.
        """
        import multiway

        if isinstance(source, str):
            preset, overrides = source, {}
        else:
            overrides = dict(source)
            preset = overrides.pop("preset")
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        return multiway.create_model(f"{preset}_{self.head}", **overrides)

    def model_source(self, preset: str, overrides: Mapping[str, Any], tokenizer: Any = None, max_text_len: int = 64) -> Any:
        """What :meth:`build_model` builds on for a config's ``model.preset`` and its field ``overrides``: for BEiT-3
        ``{"preset": preset, **overrides}`` (the tokenizer and text length are the data's business)."""
        return {"preset": preset, **overrides}

    def model_img_size(self, preset: str, overrides: Mapping[str, Any]) -> int:
        """Side S of the images the preset's model takes (the datasets are built before the model)."""
        from ...model.config import get_config

        return get_config(preset, **overrides).img_size

    def save_model(self, model: nn.Module, path: str | Path, tokenizer: Any = None, preprocessing: Mapping[str, Any] | None = None,
                   task: Mapping[str, Any] | None = None) -> Path:
        """Save a fine-tuned model as one ``.safetensors`` that :meth:`load_model` rebuilds, with the tokenizer,
        preprocessing and task embedded (:func:`multiway.save_pretrained`)."""
        import multiway

        return multiway.save_pretrained(model, path, tokenizer=tokenizer, preprocessing=preprocessing, task=task)

    @classmethod
    def load_model(cls, path: str | Path) -> nn.Module:
        """The model a :meth:`save_model` file holds (:func:`multiway.create_model`)."""
        import multiway

        return multiway.create_model(path)

    @classmethod
    def model_limits(cls, model: nn.Module) -> tuple[int, int]:
        """(S, T): the image side and the most text tokens a model of the family takes (what inference sizes its
        inputs to)."""
        return model.config.img_size, model.config.max_text_positions - 2

    def load_init(self, model: nn.Module, path: str) -> Any:
        """Initialise ``model`` from a checkpoint (official ``.pth``, multiway ``.safetensors``); returns the
        load report."""
        import multiway

        return multiway.load_checkpoint(model, path)

    # --- training and evaluation ---------------------------------------------------------------------------

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """Forward ``batch`` and the task's official loss: (scalar loss, logs of floats). ``step``: the optimizer
        step (losses with a schedule, e.g. captioning's drop-worst)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        """The task's standard metric over ``dataset`` (headline key :attr:`metric`); the model is left in the
        train/eval mode it came in."""

    @abc.abstractmethod
    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """The headline metric of a trivial predictor on ``test_set`` (uniform guessing, or a random training
        answer): the chance column of the tables."""

    def baselines(self, train_set: Dataset, test_set: Dataset) -> dict[str, float]:
        """Further trivial predictors' headline metric, by a short name (e.g. ``most_frequent_caption``)."""
        return {}

    def preprocessing(self, img_size: int, max_text_len: int = 64) -> dict[str, Any]:
        """What a model file embeds so inference rebuilds :meth:`eval_transform` without the task's code: image
        side, mean/std, interpolation, resize mode (``"squash"``: Resize((S, S)); ``"center_crop"``), text length."""
        from ...constants import IMAGENET_MEAN, IMAGENET_STD, VL_MEAN, VL_STD

        mean, std = (VL_MEAN, VL_STD) if self.normalize == "vl" else (IMAGENET_MEAN, IMAGENET_STD)
        return {"img_size": img_size, "mean": list(mean), "std": list(std), "interpolation": "bicubic", "resize": "squash",
                "crop_pct": 1.0, "max_text_len": max_text_len}

    def predict(self, predictor: Any, images: Any = None, text: Any = None, **options: Any) -> Any:
        """Prediction on in-memory or file inputs (what :class:`multiway.Processor` calls): ``images`` (paths,
        folders, PIL images, (3, H, W) tensors) and/or ``text`` (a string or a list of strings) -> a
        :class:`~multiway.downstream.inference.Result`. ``options``: the task's prediction settings (``topk``,
        ``num_beams``, ...). Tasks without prediction on user inputs refuse with a TypeError."""
        raise TypeError(f"task {self.name!r} offers no prediction on user inputs; tasks that do: "
                        "coco_captioning, vqav2, nlvr2, coco_retrieval, imagenet, text_classification")

    def metadata(self, train_set: Dataset) -> dict[str, Any]:
        """What inference needs beside the weights (written to ``task.json``)."""
        return {"task": self.name, "family": self.family, "model_task": self.head, "normalize": self.normalize,
                "labels": self.label_names(train_set)}

    def train_task(self, train_set: Dataset, batch_size: int, num_workers: int = 0, accum_steps: int = 1,
                   eval_set: Dataset | None = None, eval_settings: EvalSettings | None = None) -> TaskTrainer:
        """The :class:`~multiway.train.task.TrainTask` of the one training loop: batches of ``train_set``,
        :meth:`loss` with the optimizer step, and :meth:`evaluate` on ``eval_set`` as the loop's evaluation."""
        return TaskTrainer(self, train_set, batch_size, num_workers, accum_steps, eval_set, eval_settings)

    # --- helpers for subclasses --------------------------------------------------------------------------------

    def loader(self, dataset: Dataset, settings: EvalSettings) -> DataLoader:
        """An in-order DataLoader over ``dataset`` with :meth:`collate`."""
        return DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=settings.num_workers,
                          collate_fn=self.collate)

    def device_batches(self, model: nn.Module, dataset: Dataset, settings: EvalSettings) -> Iterator[dict[str, Any]]:
        """The batches of :meth:`loader` with their tensors on ``model``'s device (empty batches dropped)."""
        device = next(model.parameters()).device
        for batch in self.loader(dataset, settings):
            if batch.get("batch_size", 1) == 0:
                continue
            yield {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}

    def gather_outputs(self, model: nn.Module, dataset: Dataset, settings: EvalSettings,
                       outputs: Callable[[nn.Module, dict[str, Any]], Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Run ``outputs(model, batch)`` on every batch of ``dataset`` (model in eval mode, no gradients) and
        concatenate each key's tensors on the CPU along dim 0: e.g. ``{"logits": (N, C), "label": (N,)}``. A key a
        batch leaves out (VQA's ``labels`` on an unlabelled split) is simply absent from the result."""
        gathered: dict[str, list[Tensor]] = {}
        with torch.no_grad(), evaluation_mode(model):
            for batch in self.device_batches(model, dataset, settings):
                for key, value in outputs(model, batch).items():
                    gathered.setdefault(key, []).append(value.cpu())
        return {key: torch.cat(values) for key, values in gathered.items()}

    def evaluate_accuracy(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None,
                          logits_of: Callable[[nn.Module, dict[str, Any]], Tensor]) -> dict[str, float]:
        """``{"acc": percent}`` of ``logits_of(model, batch)`` (B, C) against ``batch["label"]`` (B,) over ``dataset``:
        the evaluation of the classification tasks (NLVR2, text classification, SNLI-VE)."""
        from .. import metrics

        out = self.gather_outputs(model, dataset, settings or EvalSettings(),
                                  lambda m, batch: {"logits": logits_of(m, batch).float(), "label": batch["label"]})
        return {"acc": metrics.accuracy(out["logits"], out["label"])}

    def output_path(self, settings: EvalSettings, name: str) -> Path | None:
        """``settings.out_dir / name`` (folder created) or None when no prediction files are wanted."""
        if settings.out_dir is None:
            return None
        path = Path(settings.out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(options={self.options!r})"


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, back in the train/eval mode it came in afterwards (also on errors)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class TaskTrainer(MapDatasetTask):
    """A task's :class:`MapDatasetTask`: :meth:`DownstreamTask.loss` fed the optimizer step (micro-batches
    counted from the resume point, divided by the accumulation), :meth:`DownstreamTask.evaluate` as ``evaluate``."""

    def __init__(self, task: DownstreamTask, train_set: Dataset, batch_size: int, num_workers: int = 0, accum_steps: int = 1,
                 eval_set: Dataset | None = None, eval_settings: EvalSettings | None = None) -> None:
        eval_fn = None
        if eval_set is not None:
            eval_fn = lambda model: task.evaluate(model, eval_set, eval_settings)  # noqa: E731
        super().__init__(train_set, task.collate, batch_size, self._loss, num_workers=num_workers, eval_fn=eval_fn)
        self.task, self.accum_steps, self.micro_batches = task, accum_steps, 0

    def train_batches(self, rank: int, world_size: int, seed: int, start_step: int):
        self.micro_batches = start_step
        for batch in super().train_batches(rank, world_size, seed, start_step):
            self.micro_batches += 1
            yield batch

    @property
    def step(self) -> int:
        """The optimizer step of the batch being trained on."""
        return self.micro_batches // self.accum_steps

    def _loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        return self.task.loss(model, batch, step=self.step)


def task_options_fields(task_cls: type[DownstreamTask]) -> list[str]:
    """The names of a task's option fields (for error messages and docs)."""
    return [f.name for f in dataclasses.fields(task_cls.Options)]


__all__ = ["DataSettings", "DownstreamTask", "EvalSettings", "NoOptions", "PredictCommand", "TaskTrainer", "evaluation_mode",
           "task_options_fields"]
