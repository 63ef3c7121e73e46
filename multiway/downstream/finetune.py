"""Fine-tuning runs: one config in, a trained model and its metrics out, for any task of the registry.

>>> cfg = load_config(FinetuneConfig, "configs/finetune_vqav2_base.yaml", ["data_dir=data/vqa", "model.init=beit3.pth"])
>>> metrics = finetune(cfg)            # trains with multiway.train.train, evaluates on cfg.eval_split

A run folder (``out_dir``) holds the training loop's outputs (``metrics.csv``, checkpoints) plus
``model.safetensors`` (the fine-tuned model, config embedded), ``task.json`` (what inference needs: task, its
options, tokenizer, labels, normalisation), ``finetune_config.yaml`` (the resolved config), ``eval_<split>.json``
and ``timing.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError, resolve_path, save_config
from ..log import get_logger
from ..model.config import MultiwayConfig
from ..train import TrainConfig, train
from ..train.rng import seed_everything
from .tasks import DataSettings, DownstreamTask, EvalSettings, get_task, model_family
from .tasks.base import evaluation_mode

logger = get_logger(__name__)

_MODEL_FIELDS = {f.name for f in dataclasses.fields(MultiwayConfig)}


def _model_section() -> type:
    """The ``model:`` section: ``preset``, ``init``, ``num_classes``, and every :class:`MultiwayConfig` field as an
    optional override (None keeps the preset's value), so ``model.drop_path_rate=0.1`` is checked against
    MultiwayConfig's fields and types."""
    hints = typing.get_type_hints(MultiwayConfig)
    own = [
        ("preset", str, field(default="beit3_base_patch16_224")),
        ("init", str | None, field(default=None)),
        ("num_classes", int | None, field(default=None)),
    ]
    overrides = [(f.name, typing.Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(MultiwayConfig)]  # noqa: UP045
    doc = ("The model of a fine-tune. preset: a model preset (backbone size and image size, e.g. "
           "beit3_base_patch16_480); init: the checkpoint to start from (official .pth, a multiway .safetensors of a "
           "pretraining or another task), None = from scratch; num_classes: the head's size (default: read from the "
           "data); any MultiwayConfig field (drop_path_rate, vocab_size, ...): overrides the preset's value.")

    def config_overrides(self) -> dict[str, Any]:
        """The MultiwayConfig fields this section sets."""
        return {name: getattr(self, name) for name in _MODEL_FIELDS if getattr(self, name) is not None}

    return dataclasses.make_dataclass("ModelSection", own + overrides, namespace={"__doc__": doc, "config_overrides": config_overrides,
                                                                                 "__module__": __name__})


ModelSection = _model_section()


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """:class:`TrainConfig` of a fine-tune: ``out_dir`` defaults to the run folder, and ``max_steps`` may be left
    out when the run's length is given in ``epochs``."""

    out_dir: str = ""
    max_steps: int | None = None  # None: from FinetuneConfig.epochs

    def __post_init__(self) -> None:
        steps = self.max_steps
        self.max_steps = 1 if steps is None else steps  # TrainConfig checks every other field
        super().__post_init__()
        self.max_steps = steps


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs (YAML: these keys; ``model:``, ``train:`` and ``options:`` sections)."""

    task: str  # an official task name (multiway.downstream.tasks.TASKS)
    data_dir: str  # the folder of the task's index files (paths here: relative ones from the working directory)
    out_dir: str  # the run folder
    tokenizer: str | None = None  # SentencePiece model; needed for string texts, captioning and inference
    model: ModelSection = field(default_factory=ModelSection)  # type: ignore[valid-type]
    batch_size: int = 32  # per rank
    epochs: float | None = None  # the run's length in epochs, used when train.max_steps is not set
    warmup_epochs: float | None = None  # warmup in epochs (replaces train.warmup_steps)
    max_text_len: int = 64  # text length with specials
    num_workers: int = 0  # DataLoader workers
    randaug: bool = False  # RandAugment on training images (vision-language tasks)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # training RandomResizedCrop area range
    hflip: bool = True  # training horizontal flips (off when texts say left/right)
    eval_split: str = "val"  # evaluated after training
    eval_batch_size: int | None = None  # default: 1.5 x batch_size
    # the task's own settings: a mapping of its Options fields (e.g. vqav2 has none; coco_captioning: mask_prob,
    # num_beams, ...; imagenet: mixup, cutmix, label_smoothing, auto_augment); read as that dataclass
    options: Any = None
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)

    def __post_init__(self) -> None:
        try:
            family = model_family(self.model.preset)
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
        try:
            task_cls = get_task(self.task, family)
        except KeyError as e:
            raise ConfigError(f"task: {e.args[0]}") from None
        self.options = task_cls.make_options(self.options)
        if self.epochs is None and self.train.max_steps is None:
            raise ConfigError("set the run's length: train.max_steps or epochs")

    def task_instance(self) -> DownstreamTask:
        """The configured task: its class from the registry for the preset's model family, with ``options``."""
        return get_task(self.task, model_family(self.model.preset))(self.options)

    def data_settings(self, img_size: int, tokenizer: Any, labels: list[str] | None = None) -> DataSettings:
        return DataSettings(self.data_dir, tokenizer=tokenizer, max_text_len=self.max_text_len, img_size=img_size,
                            crop_scale=tuple(self.crop_scale), hflip=self.hflip, randaug=self.randaug, labels=labels)


def load_tokenizer(path: str | None, key: str = "tokenizer") -> Any:
    """A :class:`~multiway.tokenizers.TextTokenizer` of ``path`` (relative: from the working directory, as every
    path; ``key`` names it in the error), or None."""
    if not path:
        return None
    from ..tokenizers.text import TextTokenizer

    return TextTokenizer(resolve_path(path, key, must_exist=True))


#: a fine-tune that would build a backbone this large on a CPU without a config is refused (see check_model_size)
LARGE_MODEL_PARAMS = 200_000_000


def backbone_parameters(cfg: FinetuneConfig) -> int:
    """Parameters of the configured backbone (``model.preset`` with its overrides), counted on the meta device."""
    import torch

    from ..model.config import get_config
    from ..model.multiway import MultiwayTransformer

    with torch.device("meta"):
        backbone = MultiwayTransformer(get_config(cfg.model.preset, **cfg.model.config_overrides()))
    return sum(p.numel() for p in backbone.parameters())


def check_model_size(cfg: FinetuneConfig, config_given: bool, allow_large: bool = False) -> None:
    """Refuse a fine-tune without a config (``--config``) that would build a >= 200M-parameter model on a machine
    without a GPU: the default preset is the paper's base model, far too slow for a laptop. ``allow_large`` (the
    ``--allow-large`` flag) or a GPU lets it run."""
    import torch

    # a METER preset is always named by the user (the default preset is BEiT-3's), so only BEiT-3 is checked
    if config_given or allow_large or torch.cuda.is_available() or model_family(cfg.model.preset) != "beit3":
        return
    params = backbone_parameters(cfg)
    if params >= LARGE_MODEL_PARAMS:
        raise ValueError(
            f"finetune {cfg.task} without --config would build {cfg.model.preset} ({params / 1e6:.0f}M parameters) on a CPU; "
            f"pass --config configs/finetune_tiny_{cfg.task}.yaml (or a recipe of configs/), or a small model with "
            f"model.preset=beit3_tiny_patch8_32, or --allow-large to run it anyway")


def build_task_model(task: DownstreamTask, cfg: FinetuneConfig, num_classes: int | None, tokenizer: Any = None) -> nn.Module:
    """The task's model on ``cfg.model`` (preset + overrides; a METER preset's text side sized to ``tokenizer``),
    initialised from ``cfg.model.init`` (or from scratch)."""
    source = task.model_source(cfg.model.preset, cfg.model.config_overrides(), tokenizer, cfg.max_text_len)
    model = task.build_model(source, num_classes)
    if cfg.model.init:
        report = task.load_init(model, str(resolve_path(cfg.model.init, "model.init", must_exist=True)))
        logger.info("init from %s: %s", cfg.model.init, report)
    return model


def _train_config(cfg: FinetuneConfig, task: DownstreamTask, steps_per_epoch: int, progress: bool) -> TrainConfig:
    tc = cfg.train
    accum = tc.accum_steps
    max_steps = tc.max_steps if tc.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch / accum))
    warmup = tc.warmup_steps if cfg.warmup_epochs is None else int(cfg.warmup_epochs * steps_per_epoch / accum)
    values = {f.name: getattr(tc, f.name) for f in dataclasses.fields(TrainConfig)}
    values.update(out_dir=tc.out_dir or cfg.out_dir, max_steps=max_steps, warmup_steps=warmup, progress=tc.progress and progress,
                  find_unused_parameters=tc.find_unused_parameters or task.find_unused_parameters)
    return TrainConfig(**values)


def finetune(cfg: FinetuneConfig, model: nn.Module | None = None, progress: bool = True) -> dict[str, float]:
    """Fine-tune on ``cfg.task`` with the one training loop, then evaluate on ``cfg.eval_split``.

    Returns the evaluation metrics (also written to ``out_dir/eval_<split>.json``).
    """
    task = cfg.task_instance()
    tok = load_tokenizer(cfg.tokenizer)
    img_size = task.model_img_size(cfg.model.preset, cfg.model.config_overrides())
    train_set = task.build_dataset("train", cfg.data_settings(img_size, tok))
    num_classes = task.num_classes(train_set)
    if num_classes is not None and cfg.model.num_classes:
        num_classes = cfg.model.num_classes
    if model is None:
        # a fresh head (and a from-scratch backbone) must not depend on what this process drew before
        seed_everything(int(cfg.train.seed))
        model = build_task_model(task, cfg, num_classes, tok)
    labels = task.label_names(train_set)
    eval_set = task.build_dataset(cfg.eval_split, cfg.data_settings(img_size, tok, labels))
    tcfg = _train_config(cfg, task, max(1, len(train_set) // cfg.batch_size), progress)
    out = Path(cfg.out_dir)
    eval_settings = EvalSettings(batch_size=cfg.eval_batch_size or max(1, int(cfg.batch_size * 1.5)), num_workers=cfg.num_workers,
                                 out_dir=str(out), split=cfg.eval_split)

    t0 = time.perf_counter()
    train(model, task.train_task(train_set, cfg.batch_size, num_workers=cfg.num_workers, accum_steps=tcfg.accum_steps), tcfg)
    train_s = time.perf_counter() - t0
    # the model file carries its tokenizer, preprocessing and task, so it predicts and evaluates on its own
    task.save_model(model, out / "model.safetensors", tokenizer=tok, preprocessing=task.preprocessing(img_size, cfg.max_text_len),
                    task=task_file_metadata(task, train_set, cfg))
    write_task_json(out, cfg, task, train_set)
    save_config(cfg, out / "finetune_config.yaml")
    t0 = time.perf_counter()
    with evaluation_mode(model):  # as the loop's evaluations: a task whose evaluate leaves the mode alone (METER's) scores without dropout
        result = task.evaluate(model, eval_set, eval_settings)
    (out / f"eval_{cfg.eval_split}.json").write_text(json.dumps(result, indent=2))
    (out / "timing.json").write_text(json.dumps({"train_s": round(train_s, 2), "eval_s": round(time.perf_counter() - t0, 2)}))
    return result


def task_file_metadata(task: DownstreamTask, train_set: Any, cfg: FinetuneConfig) -> dict[str, Any]:
    """What a fine-tuned model file embeds about its task: name, head, labels, options, text length."""
    from ..config import to_dict

    return {**task.metadata(train_set), "options": to_dict(task.options), "max_text_len": cfg.max_text_len}


def write_task_json(out: Path, cfg: FinetuneConfig, task: DownstreamTask, train_set: Any) -> None:
    """What ``multiway predict`` and ``multiway evaluate`` need beside the weights."""
    from ..config import to_dict

    meta = {**task.metadata(train_set), "options": to_dict(task.options),
            "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None, "max_text_len": cfg.max_text_len}
    (out / "task.json").write_text(json.dumps(meta, indent=2))


__all__ = ["LARGE_MODEL_PARAMS", "FinetuneConfig", "FinetuneTrainConfig", "ModelSection", "backbone_parameters", "build_task_model",
           "check_model_size", "finetune", "load_tokenizer", "task_file_metadata", "write_task_json"]
