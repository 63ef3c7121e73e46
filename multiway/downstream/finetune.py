"""Fine-tuning and evaluation runs: one config in, a trained model and its metrics out.

>>> cfg = FinetuneConfig.load("configs/finetune_vqav2_base.yaml", data_dir="data/vqa", init="beit3_base_patch16_224.pth")
>>> metrics = finetune(cfg)            # trains with multiway.train.train, evaluates on the val split
>>> evaluate("runs/vqav2", split="test-dev")

A run folder (``out_dir``) holds the training loop's outputs (``metrics.csv``, checkpoints) plus
``model.safetensors`` (the fine-tuned model, config embedded), ``task.json`` (what inference needs: task,
tokenizer, labels, normalisation) and ``eval_<split>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..config import load_yaml
from ..train import MapDatasetTask, TrainConfig, train
from ..train.loop import seed_everything
from .task_specs import EvalOptions, LossOptions, TaskSpec, build_dataset, collate, evaluate_model, get_task, task_loss


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs. YAML: these fields at top level, ``train:`` holds :class:`TrainConfig`
    fields (lr, layer_decay, head_lr_scale, weight_decay, warmup_steps ...; ``max_steps`` may be replaced by
    ``epochs`` here, and ``warmup_steps`` by ``warmup_epochs``)."""

    task: str
    data_dir: str
    out_dir: str
    model: str = "beit3_base_patch16_224"  # a preset (backbone size and image size)
    init: str | None = None  # official .pth, a multiway .safetensors (pretraining or other task), or None = scratch
    tokenizer: str | None = None  # SentencePiece model; needed for string texts, captioning and inference
    model_overrides: dict[str, Any] = field(default_factory=dict)  # config fields, e.g. drop_path_rate, vocab_size
    num_classes: int | None = None  # default: read from the data (imagenet labels, answer2label.txt, text labels)
    batch_size: int = 32
    epochs: float | None = None
    warmup_epochs: float | None = None
    max_text_len: int = 64
    num_workers: int = 0
    randaug: bool = False
    imagenet_auto_augment: bool = True  # False: ImageNet training without timm's RandAugment/random erasing
    crop_scale: tuple[float, float] = (0.5, 1.0)  # training RandomResizedCrop area range (VL tasks; ImageNet without auto-augment)
    hflip: bool = True  # training horizontal flips (off when texts say left/right)
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    mask_prob: float = 0.6  # captioning
    drop_worst_ratio: float = 0.2
    drop_worst_after: int = 12000
    label_smoothing_captioning: float = 0.1
    num_beams: int = 3
    max_gen_len: int = 32
    length_penalty: float = 0.6
    caption_metrics: list[str] | None = None  # captioning evaluation: just these (e.g. [CIDEr]); default all
    eval_split: str = "val"
    eval_batch_size: int | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_task(self.task)

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> FinetuneConfig:
        data = load_yaml(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of FinetuneConfig fields")
        train_over = overrides.pop("train", {}) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["train"] = {**(data.get("train") or {}), **train_over}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; valid: {sorted(names)}")
        missing = [n for n in ("task", "data_dir", "out_dir") if not data.get(n)]
        if missing:
            raise ValueError(f"{path}: missing {missing} (set them in the file or on the command line)")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _tokenizer(path: str | None):
    if not path:
        return None
    from ..tokenizers.text import TextTokenizer

    return TextTokenizer(path)


def _num_classes(spec: TaskSpec, cfg: FinetuneConfig, train_set) -> int | None:
    if spec.head in ("retrieval", "captioning"):
        return None
    if cfg.num_classes:
        return cfg.num_classes
    if spec.head == "vqav2":
        return train_set.num_labels
    if spec.head == "nlvr2":
        return 2
    if spec.head == "textclassification":
        return len(train_set.label_names)
    return max(int(i["label"]) for i in train_set.items) + 1


def build_task_model(spec: TaskSpec, cfg: FinetuneConfig, num_classes: int | None) -> nn.Module:
    """``create_model("<preset>_<head>")`` initialised from ``cfg.init`` (or from scratch)."""
    import multiway

    kwargs = dict(cfg.model_overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = multiway.create_model(f"{cfg.model}_{spec.head}", **kwargs)
    if cfg.init:
        report = multiway.load_checkpoint(model, cfg.init)
        print(f"[multiway] init from {cfg.init}: {report}", flush=True)
    return model


class _StepCountingTask(MapDatasetTask):
    """MapDatasetTask that knows the optimizer step (the captioning loss drops the worst tokens after N steps)."""

    def __init__(self, *args, accum_steps: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.accum_steps, self.micro_batches = accum_steps, 0

    def train_batches(self, rank, world_size, seed, start_step):
        self.micro_batches = start_step
        for batch in super().train_batches(rank, world_size, seed, start_step):
            self.micro_batches += 1
            yield batch

    @property
    def step(self) -> int:
        return self.micro_batches // self.accum_steps


def finetune(cfg: FinetuneConfig, model: nn.Module | None = None, progress: bool = True) -> dict[str, float]:
    """Fine-tune on ``cfg.task`` with the one training loop, then evaluate on ``cfg.eval_split``.

    Returns the evaluation metrics (also written to ``out_dir/eval_<split>.json``).
    """
    import multiway

    spec = get_task(cfg.task)
    tok = _tokenizer(cfg.tokenizer)
    preset_img = multiway.get_config(cfg.model, **{k: v for k, v in cfg.model_overrides.items() if k != "drop_path_rate"}).img_size
    data_kwargs: dict[str, Any] = dict(tokenizer=tok, max_len=cfg.max_text_len, img_size=preset_img)
    if spec.head == "captioning":
        data_kwargs["mask_prob"] = cfg.mask_prob
    train_set = build_dataset(spec, cfg.data_dir, "train", randaug=cfg.randaug, imagenet_auto_augment=cfg.imagenet_auto_augment,
                              crop_scale=cfg.crop_scale, hflip=cfg.hflip, **data_kwargs)
    num_classes = _num_classes(spec, cfg, train_set)
    if model is None:
        # a fresh head (and a from-scratch backbone) must not depend on what this process drew before
        seed_everything(int(cfg.train.get("seed", 0)))
        model = build_task_model(spec, cfg, num_classes)
    eval_kwargs = dict(data_kwargs)
    eval_kwargs.pop("mask_prob", None)
    if spec.head == "textclassification":
        eval_kwargs["label_names"] = train_set.label_names
    eval_set = build_dataset(spec, cfg.data_dir, cfg.eval_split, **eval_kwargs)

    tc = dict(cfg.train)
    tc.setdefault("out_dir", cfg.out_dir)
    tc.setdefault("progress", progress)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    if "max_steps" not in tc:
        if cfg.epochs is None:
            raise ValueError("set train.max_steps or epochs in the fine-tuning config")
        tc["max_steps"] = max(1, math.ceil(cfg.epochs * steps_per_epoch / tc.get("accum_steps", 1)))
    if cfg.warmup_epochs is not None and "warmup_steps" not in tc:
        tc["warmup_steps"] = int(cfg.warmup_epochs * steps_per_epoch / tc.get("accum_steps", 1))
    if spec.head in ("captioning", "retrieval", "textclassification"):
        tc.setdefault("find_unused_parameters", True)  # one modality's expert gets no gradient in some passes
    tcfg = TrainConfig.from_dict(tc)

    loss_opts = LossOptions(label_smoothing=cfg.label_smoothing, mixup=cfg.mixup, cutmix=cfg.cutmix, num_classes=num_classes or 0,
                            captioning_label_smoothing=cfg.label_smoothing_captioning, drop_worst_ratio=cfg.drop_worst_ratio,
                            drop_worst_after=cfg.drop_worst_after)
    eval_opts = EvalOptions(batch_size=cfg.eval_batch_size or max(1, int(cfg.batch_size * 1.5)), num_workers=cfg.num_workers,
                            num_beams=cfg.num_beams, max_len=cfg.max_gen_len, length_penalty=cfg.length_penalty,
                            caption_metrics=cfg.caption_metrics)
    task: _StepCountingTask

    def loss_fn(m, batch):
        return task_loss(spec, m, batch, loss_opts, step=task.step)

    task = _StepCountingTask(train_set, collate, cfg.batch_size, loss_fn, num_workers=cfg.num_workers,
                             accum_steps=tcfg.accum_steps)
    t0 = time.perf_counter()
    train(model, task, tcfg)
    train_s = time.perf_counter() - t0
    out = Path(cfg.out_dir)
    multiway.save_pretrained(model, out / "model.safetensors")
    write_task_json(out, cfg, spec, train_set)
    (out / "finetune_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t0 = time.perf_counter()
    result = evaluate_model(spec, model, eval_set, eval_opts)
    (out / f"eval_{cfg.eval_split}.json").write_text(json.dumps(result, indent=2))
    (out / "timing.json").write_text(json.dumps({"train_s": round(train_s, 2), "eval_s": round(time.perf_counter() - t0, 2)}))
    return result


def write_task_json(out: Path, cfg: FinetuneConfig, spec: TaskSpec, train_set) -> None:
    """What ``multiway predict`` needs beside the weights."""
    labels = None
    if spec.head == "vqav2":
        labels = [train_set.label2answer[i] for i in range(len(train_set.label2answer))]
    elif spec.head == "textclassification":
        labels = train_set.label_names
    meta = {
        "task": spec.name, "model_task": spec.head, "normalize": spec.normalize,
        "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None,
        "labels": labels, "max_text_len": cfg.max_text_len,
        "generation": {"num_beams": cfg.num_beams, "max_len": cfg.max_gen_len, "length_penalty": cfg.length_penalty},
    }
    (out / "task.json").write_text(json.dumps(meta, indent=2))


def evaluate(run_or_model: str | os.PathLike, task: str | None = None, data_dir: str | None = None, split: str = "val",
             tokenizer: str | None = None, batch_size: int = 64, num_beams: int = 3, max_len: int | None = None,
             length_penalty: float = 0.6, submission: str | None = None, device: str | None = None) -> dict[str, float]:
    """Evaluate a fine-tuned run folder (or a ``.safetensors`` model plus ``task``/``data_dir``) on ``split``.

    VQA test splits write the submission json (``submission`` or ``<run>/submit_vqav2_<split>.json``).
    """
    import multiway


    path = Path(run_or_model)
    saved: dict[str, Any] = {}
    if path.is_dir():
        if (path / "finetune_config.yaml").is_file():
            saved = load_yaml((path / "finetune_config.yaml").read_text())
        path = path / "model.safetensors"
    task = task or saved.get("task")
    data_dir = data_dir or saved.get("data_dir")
    tokenizer = tokenizer or saved.get("tokenizer")
    if not task or not data_dir:
        raise ValueError("evaluate: give --task and --data-dir (or a run folder written by `multiway finetune`)")
    spec = get_task(task)
    model = multiway.create_model(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    tok = _tokenizer(tokenizer)
    kwargs: dict[str, Any] = dict(tokenizer=tok, max_len=int(saved.get("max_text_len", 64)), img_size=model.config.img_size)
    if spec.head == "textclassification":
        kwargs["label_names"] = json.loads((Path(run_or_model) / "task.json").read_text())["labels"] if Path(run_or_model).is_dir() else None
    dataset = build_dataset(spec, data_dir, split, **kwargs)
    opts = EvalOptions(batch_size=batch_size, num_beams=num_beams, max_len=max_len or int(saved.get("max_gen_len", 32)),
                       length_penalty=length_penalty)
    if spec.head == "vqav2" and split.startswith("test"):
        opts.submission_path = submission or str(Path(run_or_model if Path(run_or_model).is_dir() else ".") / f"submit_vqav2_{split}.json")
    if spec.head == "captioning":
        opts.predictions_path = str(Path(run_or_model if Path(run_or_model).is_dir() else ".") / f"captions_{split}.json")
    return evaluate_model(spec, model, dataset, opts)


__all__ = ["FinetuneConfig", "build_task_model", "evaluate", "finetune"]
