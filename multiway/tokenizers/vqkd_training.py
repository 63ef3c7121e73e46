"""VQ-KD training against a frozen teacher, through the one training loop (:func:`multiway.train.train`), and the
linear probe of a trained tokenizer.

:class:`VQKDTrainConfig` holds the run: the images, the preset and its changed fields, the teacher, and a
:class:`~multiway.train.TrainConfig` (lr schedule, logging, checkpoints, resume) as every other run has.
:class:`VQKDTask` is the :class:`~multiway.train.TrainTask`: batches of images, loss = reconstruction of the
teacher's features plus the commitment loss, evaluation = codebook usage over one pass of the images.
The run folder (``train.out_dir``) gets ``metrics.csv``, TensorBoard logs and resumable checkpoints; the tokenizer
itself is written to ``out`` at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check_keys, from_dict, to_dict
from ..constants import INDEX_FILES
from ..train.checkpointing import latest_checkpoint
from ..train.config import TrainConfig
from ..train.loop import train
from ..train.task import MapDatasetTask
from .teachers import build_teacher
from .vqkd import VQKD, VQKDConfig, load_vqkd, save_vqkd, vqkd_config

USAGE_WINDOW = 50  # steps over which the logged codebook usage (usage_window) is counted


# ----------------------------------------------------------------------------------------------------------------
# data


class ImageFiles(torch.utils.data.Dataset):
    """Every image file under a folder (recursively), as (3, S, S) tensors in [0, 1]."""

    EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, root: str | os.PathLike, img_size: int, train: bool = True, min_crop_scale: float = 0.08,
                 files: Sequence[str | os.PathLike] | None = None) -> None:
        from torchvision.transforms import v2

        self.files = [Path(f) for f in files] if files is not None else sorted(
            p for p in Path(root).rglob("*") if p.suffix.lower() in self.EXTS)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(self.EXTS)}) under {root}")
        crop = (v2.RandomResizedCrop(img_size, scale=(min_crop_scale, 1.0), antialias=True,
                                     interpolation=v2.InterpolationMode.BICUBIC) if train
                else v2.Resize((img_size, img_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True))
        ops = [v2.ToImage(), crop] + ([v2.RandomHorizontalFlip()] if train else [])
        self.transform = v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")).clamp_(0, 1)  # bicubic overshoots


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of codes with a non-zero count."""
    return float((counts > 0).float().mean())


def _default_train() -> TrainConfig:
    # BEiT v2's tokenizer recipe: AdamW(0.9, 0.99), linear warmup, cosine decay to lr/5; fp32 (the EMA codebook
    # statistics are kept exact)
    return TrainConfig(out_dir="", max_steps=1000, lr=1e-3, min_lr=2e-4, warmup_steps=50, weight_decay=1e-4,
                       betas=(0.9, 0.99), eps=1e-8, grad_clip=None, precision="fp32", log_every=10, save_every=500,
                       keep_last=1)


@dataclass
class VQKDTrainConfig:
    """``multiway tokenizer train-visual``: a VQ-KD tokenizer trained against a frozen teacher."""

    data: str = ""  # folder of images, searched recursively
    out: str = ""  # the trained tokenizer (.safetensors), written at the end
    preset: str = "vqkd_tiny_patch8_64"  # VQ_KD_PRESETS name
    model: dict[str, Any] = field(default_factory=dict)  # VQKDConfig fields changed from the preset (n_code: 512)
    teacher: str = "pixels"  # pixels | timm:<model> (with teacher_weights) | torchscript:<file> | multiway:<checkpoint>
    teacher_weights: str | None = None  # local weights file of a timm teacher (nothing is downloaded)
    batch_size: int = 64  # images per rank and step
    min_crop_scale: float = 0.5  # RandomResizedCrop area range starts here
    num_workers: int = 2  # dataloader workers
    # the run folder (metrics.csv, tb/, checkpoints/); out_dir "" = "<out without suffix>_run"
    train: TrainConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        check_keys(self.model, (f.name for f in dataclasses.fields(VQKDConfig)), "model")
        if self.preset not in _presets():
            raise ValueError(f"preset={self.preset!r} is not a VQ-KD preset; accepted values: {sorted(_presets())}")

    @property
    def run_dir(self) -> str:
        """``train.out_dir``, or ``<out without suffix>_run`` when it is empty."""
        if self.train.out_dir:
            return self.train.out_dir
        out = Path(self.out)
        return str(out.with_name(f"{out.stem}_run"))


def _presets() -> dict[str, VQKDConfig]:
    from .vqkd import VQKD_PRESETS

    return VQKD_PRESETS


class VQKDTask(MapDatasetTask):
    """The :class:`~multiway.train.TrainTask` of VQ-KD training over a dataset of images (3, S, S) in [0, 1].

    ``loss`` runs the frozen teacher (on the batch's device) and the tokenizer; it logs ``rec_loss``,
    ``quant_loss`` and ``usage_window``, the fraction of codes hit during the last :data:`USAGE_WINDOW` steps.
    ``evaluate`` measures the codebook usage over one pass of ``eval_set`` (``codebook_usage``, ``codes_used``).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, eval_set: torch.utils.data.Dataset, teacher: nn.Module,
                 n_code: int, batch_size: int, num_workers: int = 0) -> None:
        super().__init__(dataset, None, batch_size, self._loss, num_workers=num_workers, eval_fn=self._evaluate)
        self.eval_set, self.teacher, self.n_code = eval_set, teacher.eval().requires_grad_(False), n_code
        self.hits: deque[torch.Tensor] = deque(maxlen=USAGE_WINDOW)

    def _loss(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        self.teacher.to(images.device)
        with torch.no_grad():
            target = self.teacher(images)
        out = model(images, target)
        self.hits.append(torch.bincount(out["indices"].flatten(), minlength=self.n_code).cpu())
        window = torch.stack(tuple(self.hits)).sum(0)
        return out["loss"], {"rec_loss": float(out["rec_loss"]), "quant_loss": float(out["quant_loss"]),
                             "usage_window": codebook_usage(window)}

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total = torch.zeros(self.n_code)
        loader = torch.utils.data.DataLoader(self.eval_set, batch_size=self.batch_size, num_workers=self.num_workers)
        for images in loader:
            total += torch.bincount(model.get_codebook_indices(images.to(device)).flatten().cpu(),
                                    minlength=self.n_code).float()
        return {"codebook_usage": codebook_usage(total), "codes_used": float((total > 0).sum())}


def train_vqkd(cfg: VQKDTrainConfig, dataset: torch.utils.data.Dataset | None = None, resume: bool = True) -> dict[str, Any]:
    """Train a VQ-KD tokenizer as ``cfg`` says and write it to ``cfg.out``; returns the final metrics.

    ``dataset`` (optional) replaces the image folder ``cfg.data`` with a Dataset of (3, S, S) tensors in [0, 1].
    The decoder's output width is set from the teacher. A run interrupted in ``train.out_dir`` resumes from its
    last checkpoint. Returns the last logged training metrics (``loss``, ``rec_loss``, ``quant_loss``,
    ``usage_window``), ``steps``, ``codebook_usage``/``codes_used`` over one pass of the images and ``path``.
    """
    from ..log import process_rank

    if not cfg.out:
        raise ValueError("VQKDTrainConfig.out: the output .safetensors path is required")
    torch.manual_seed(cfg.train.seed)
    model_cfg = vqkd_config(cfg.preset, **cfg.model)
    if dataset is None:
        if not cfg.data:
            raise ValueError("VQKDTrainConfig.data: a folder of images is required")
        dataset = ImageFiles(cfg.data, model_cfg.img_size, True, cfg.min_crop_scale)
        eval_set: torch.utils.data.Dataset = ImageFiles(cfg.data, model_cfg.img_size, train=False)
    else:
        eval_set = dataset
    teacher = build_teacher(cfg.teacher, model_cfg.grid, model_cfg.patch_size, cfg.teacher_weights)
    with torch.no_grad():  # the teacher's width decides the decoder's output width
        model_cfg = dataclasses.replace(model_cfg, decoder_out_dim=teacher(dataset[0][None]).shape[-1])
    model = VQKD(model_cfg)
    task = VQKDTask(dataset, eval_set, teacher, model_cfg.n_code, cfg.batch_size, cfg.num_workers)
    train_cfg = dataclasses.replace(cfg.train, out_dir=cfg.run_dir)
    result = train(model, task, train_cfg, resume=resume)
    latest = latest_checkpoint(train_cfg.out_dir)
    metrics: dict[str, Any] = {k: v for k, v in result.items() if not k.startswith("eval/")}
    metrics.update(steps=int(latest.name[5:]) if latest is not None else 0,
                   codebook_usage=result.get("eval/codebook_usage", 0.0),
                   codes_used=int(result.get("eval/codes_used", 0)))
    if process_rank() == 0:
        extra = {"teacher": cfg.teacher, "metrics": metrics, "config": to_dict(cfg)}
        metrics["path"] = str(save_vqkd(model.eval(), cfg.out, extra=extra))
    return metrics


def train_visual_tokenizer(
    data: str | os.PathLike | torch.utils.data.Dataset,
    out: str | os.PathLike,
    preset: str = "vqkd_tiny_patch8_64",
    teacher: str = "pixels",
    teacher_weights: str | os.PathLike | None = None,
    steps: int = 1000,
    max_minutes: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_steps: int = 50,
    min_crop_scale: float = 0.5,
    num_workers: int = 2,
    seed: int = 0,
    config_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    run_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """:func:`train_vqkd` with its settings as keywords (the cosine schedule ends at ``lr / 5``).

    ``data`` is a folder of images or a Dataset of (3, S, S) tensors in [0, 1]; ``config_overrides`` are
    VQKDConfig fields; ``run_dir`` is the run folder (default ``<out without suffix>_run``).
    """
    dataset = data if isinstance(data, torch.utils.data.Dataset) else None
    train_settings = dict(max_steps=steps, max_minutes=max_minutes, lr=lr, min_lr=lr / 5, weight_decay=weight_decay,
                          warmup_steps=warmup_steps, seed=seed, progress=progress, out_dir=str(run_dir or ""))
    cfg = from_dict(VQKDTrainConfig, {
        "data": "" if dataset is not None else str(data), "out": str(out), "preset": preset,
        "model": dict(config_overrides or {}), "teacher": teacher,
        "teacher_weights": None if teacher_weights is None else str(teacher_weights), "batch_size": batch_size,
        "min_crop_scale": min_crop_scale, "num_workers": num_workers, "train": train_settings,
    })
    return train_vqkd(cfg, dataset)


# ----------------------------------------------------------------------------------------------------------------
# the probe


def code_histograms(model: VQKD, images: Iterable[torch.Tensor], device: str | torch.device = "cpu") -> torch.Tensor:
    """Bag-of-codes of each image: batches (B, 3, H, W) in [0, 1] -> (num_images, n_code) normalised counts."""
    rows = []
    model = model.to(device).eval()
    for batch in images:
        idx = model.get_codebook_indices(batch.to(device)).cpu()
        h = torch.zeros(idx.shape[0], model.n_code).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float))
        rows.append(h / idx.shape[1])
    return torch.cat(rows)


def probe_visual_tokenizer(tokenizer: str | os.PathLike | VQKD, data_dir: str | os.PathLike,
                           train_index: str = INDEX_FILES["imagenet"]["train"][0],
                           val_index: str = INDEX_FILES["imagenet"]["val"][0], epochs: int = 200,
                           batch_size: int = 256) -> dict[str, float]:
    """Linear probe on bag-of-codes histograms over an ImageNet-style index (``image_path``, ``label``).

    Trains a softmax classifier on the train index's histograms and reports val accuracy. When the class
    folder names are ``<part>_<part>`` (the built-in data's ``<colour>_<shape>``), it also reports the accuracy
    of each part (e.g. colour alone) derived from the class predictions.
    """
    model = tokenizer if isinstance(tokenizer, VQKD) else load_vqkd(tokenizer)
    root = Path(data_dir)

    def read(index: str) -> tuple[list[Path], torch.Tensor]:
        rows = [json.loads(line) for line in (root / index).read_text().splitlines() if line.strip()]
        return [root / r["image_path"] for r in rows], torch.tensor([int(r["label"]) for r in rows])

    def hist(files: list[Path]) -> torch.Tensor:
        ds = ImageFiles(root, model.config.img_size, train=False, files=files)
        return code_histograms(model, torch.utils.data.DataLoader(ds, batch_size=batch_size))

    tr_files, ytr = read(train_index)
    va_files, yva = read(val_index)
    xtr, xva = hist(tr_files), hist(va_files)
    num_classes = int(max(ytr.max(), yva.max())) + 1
    with torch.random.fork_rng():  # a fixed classifier init, so the probe is reproducible
        torch.manual_seed(0)
        clf = nn.Linear(model.n_code, num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=0.05)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    for _ in range(epochs):  # full-batch; the data is small
        loss = F.cross_entropy(clf((xtr - mu) / sd), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pred = clf((xva - mu) / sd).argmax(-1)
    result = {"class_accuracy": float((pred == yva).float().mean()), "num_classes": float(num_classes),
              "chance": float(torch.bincount(yva).max()) / len(yva)}
    # class names from the folder layout <split>/<class>/<file>
    names: dict[int, str] = {}
    for f, y in zip(tr_files, ytr.tolist()):
        names.setdefault(y, f.parent.name)
    parts = [names.get(i, "").split("_") for i in range(num_classes)]
    if all(len(p) == len(parts[0]) > 1 for p in parts):
        for j in range(len(parts[0])):
            got = torch.tensor([parts[i][j] == parts[t][j] for i, t in zip(pred.tolist(), yva.tolist())])
            result[f"part{j}_accuracy"] = float(got.float().mean())
    return result
