"""``multiway quickstart``: built-in data -> tiny pretraining -> fine-tune and evaluate every adaptation mode.

Prints one table (task, metric, from-pretrained, from-scratch, chance) and writes, under ``out_dir``:
``results.json``, ``results.md``, ``loss_curves.png`` and ``examples.png`` (test images with generated
captions, VQA answers and retrieval hits).
"""

from __future__ import annotations

import copy
import json
import os
import random
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import deep_update, from_dict, read_yaml_mapping, save_config, to_dict
from ..log import get_logger

logger = get_logger(__name__)

# --- settings: every number the quickstart uses, in one place ------------------------------------------------


@dataclass
class TaskPlan:
    """How one task is fine-tuned in the quickstart (same plan from pretrained and from scratch)."""

    split: str  # held-out split the table reports
    steps: int
    lr: float
    batch_size: int = 32
    warmup_steps: int = 20
    data_subdir: str = ""  # the task's index files are in this folder of the built-in data
    max_text_len: int | None = None  # None: QuickstartConfig.max_text_len
    options: dict[str, Any] = field(default_factory=dict)  # the task's own options (its Options fields)
    # relative seconds per step (2-core CPU: NLVR2 = 1, 0.1 s/step), to start the longest fine-tunes first
    step_cost: float = 1.0


@dataclass
class QuickstartConfig:
    """All quickstart settings. ``QuickstartConfig.preset("full" | "fast")``; ``--config FILE.yaml`` and
    ``key=value`` overrides change any field (``tasks: {vqav2: {steps: 400}}`` merges into the preset's plan)."""

    model: str = "beit3_tiny_patch8_32"
    # torch intra-op threads per process; None: $OMP_NUM_THREADS, else 1. The tiny model's ops are too small to
    # gain from a second thread, and on a busy machine 2 threads made them many times slower (VQ-KD: 2.7 s/step
    # with 2 threads vs 0.17 s with 1, load 4 on 2 cores); the fine-tunes use the cores through ``workers``.
    threads: int | None = None
    workers: int = 2  # fine-tunes run side by side in this many processes
    # built-in data (multiway.data.shapes.generate_synthetic_dataset)
    num_images: int = 1500
    num_pairs: int = 6000  # NLVR2: a tiny model learns the two-image statements only from thousands of examples
    imagenet_per_class: int = 24
    img_size: int = 32
    vocab_size: int = 500
    # augmentation for pretraining and fine-tuning: the shapes are a few pixels wide and the texts say left/right,
    # so random crops would cut out what the text names and flips would contradict it
    crop_scale: tuple[float, float] = (1.0, 1.0)
    hflip: bool = False
    color_jitter: float = 0.0
    # VQ-KD visual tokenizer (pixels teacher), cached in the data folder
    vqkd_steps: int = 150
    # masked data modeling
    pretrain_steps: int = 1500  # fewer (600) left the fused model reading nothing from the image
    pretrain_batch: int = 32  # per stream (text, image, pair)
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 30
    pretrain_eval_size: int = 256
    # also mask 40% of the image of each pair: predicting image tokens from the caption and the rest of the image
    # made the fused model learn to look things up in the image ("is there a red shape?" probe: 77% vs 54% without,
    # same data and seed; see docs/downstream.md)
    pretrain_pair_image_mask: float = 0.4
    # image-text contrastive loss on the pairs beside masked data modeling (PretrainConfig.itc_weight)
    pretrain_itc_weight: float = 1.0
    # text classification: labelled training captions per class (None: all 2400). With all of them both columns
    # reach 100%; with a few, what the language encoder learned in pretraining shows (4 per class: 94.7 vs 90.0)
    text_train_per_class: int | None = 8
    # fine-tuning
    max_text_len: int = 24
    # official task name -> its TaskPlan (a mapping of TaskPlan fields in YAML), in table order
    tasks: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        from .tasks import TASKS

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown quickstart task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
        self.tasks = {name: plan if isinstance(plan, TaskPlan) else from_dict(TaskPlan, plan, where=f"tasks.{name}")
                      for name, plan in self.tasks.items()}
        for name, plan in self.tasks.items():  # each plan's options are its task's own fields
            TASKS[name].make_options(plan.options, where=f"tasks.{name}.options")

    @staticmethod
    def preset_dict(name: str = "full") -> dict[str, Any]:
        """The settings of a preset as a mapping (the base that ``--config`` and overrides change)."""
        if name not in PRESETS:
            raise KeyError(f"unknown quickstart preset {name!r}; choose from {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[name])

    @classmethod
    def preset(cls, name: str = "full") -> QuickstartConfig:
        return from_dict(cls, cls.preset_dict(name))

    def update(self, overrides: dict[str, Any]) -> QuickstartConfig:
        """A new config with ``overrides`` merged in (nested mappings key by key; unknown keys name the valid ones)."""
        return from_dict(type(self), deep_update(to_dict(self), overrides))


# The tiny detectors: 32-channel pyramid, small box head, few RoIs; jitter kept mild at 32 px. The 32-px scenes go
# into the detector at 64 px (input_size): the 6-12 px shapes then span 1.5-3 patches instead of one (box AP 1.1 ->
# 8.7 at 200 steps, lr 1e-3). 200 RPN boxes per level into NMS instead of 2000 and 32 RoIs per image pay for it (NMS
# was 28% of a 64-px step): a step costs what a 32-px step did (CPU time 0.13 s detection, 0.15 s with masks).
_DENSE_DETECTION = dict(out_channels=32, box_head_width=128, input_size=64, rpn_pre_nms_top_n_train=200, rpn_pre_nms_top_n_test=200,
                        box_batch_size_per_image=32, rpn_post_nms_top_n_train=100, rpn_post_nms_top_n_test=100,
                        jitter_min=0.5, jitter_max=1.5)
# The built-in tokenizer has whole-word pieces: captions, questions and statements fit in 24 tokens.
_FULL_TASKS: dict[str, dict[str, Any]] = {
    "imagenet": dict(split="val", steps=500, lr=2e-3, data_subdir="imagenet", options=dict(auto_augment=False), step_cost=0.43),
    # 700 steps: colour questions 32-37% (the models read the image little: 47-49 vs 42-43 beside other pictures);
    # 2000: 68-74% (58 vs 43)
    "vqav2": dict(split="val", steps=2000, lr=1e-3, step_cost=0.62),
    # 800 steps: 53%, 1600: 62% (with statements about counts too)
    "nlvr2": dict(split="test", steps=1600, lr=1e-3, step_cost=1.0),
    # a high lr collapses the dual encoder (every [CLS] embedding the same, loss = log(batch)): 3e-3 did at once
    "coco_retrieval": dict(split="test", steps=350, lr=1e-3, warmup_steps=40, step_cost=0.58),
    "coco_captioning": dict(split="test", steps=600, lr=2e-3, step_cost=0.9,
                            options=dict(mask_prob=0.5, drop_worst_after=10**9, num_beams=2, max_gen_len=20)),
    "text_classification": dict(split="test", steps=400, lr=2e-3, step_cost=0.33),
    # dense tasks (multiway.dense) on the same scenes: torchvision's detectors with small heads, UperNet, CoNLL tags
    "coco_detection": dict(split="test", steps=200, lr=3e-3, batch_size=8, step_cost=4.0, options=_DENSE_DETECTION),
    "coco_instance_segmentation": dict(split="test", steps=200, lr=2e-3, batch_size=8, step_cost=4.5,
                                       options={**_DENSE_DETECTION, "mask_head_width": 16}),
    # input_scale 2 (crops at 64 px into the encoder, lr 5e-3): mIoU 17.9 -> 22.4 at batch 16; batch 8 (20.2) keeps the
    # step near the 32-px batch-16 one (CPU time 0.07 vs 0.05 s; paid by the detectors' cheaper steps)
    "ade20k": dict(split="test", steps=300, lr=5e-3, batch_size=8, step_cost=0.7,
                   options=dict(channels=32, aux_channels=16, input_scale=2.0)),
    # few-shot, as text_classification: with all 6000 captions both columns reach F1 100; with 8 (a seeded draw)
    # the shape and colour words the training sentences never show must come from pretraining (82 vs 71)
    "conll": dict(split="test", steps=200, lr=1e-3, batch_size=8, step_cost=0.15, options=dict(train_sentences=8)),
}
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(tasks=_FULL_TASKS),
    # smoke version for tests: tiny data, a few steps, the same code path
    "fast": dict(num_images=160, num_pairs=60, imagenet_per_class=4, vocab_size=200, vqkd_steps=10, pretrain_steps=6,
                 pretrain_batch=16, pretrain_warmup=2, pretrain_eval_size=32, progress=False, workers=1,
                 tasks={t: {**p, "steps": 4, "batch_size": 16, "warmup_steps": 1} for t, p in _FULL_TASKS.items()}),
}
PRESETS["fast"]["tasks"]["conll"]["batch_size"] = 8  # its few-shot training set is 8 sentences
# the smoke run scores captions with CIDEr alone (the other COCO metrics start a JVM)
PRESETS["fast"]["tasks"]["coco_captioning"]["options"] = {**_FULL_TASKS["coco_captioning"]["options"], "caption_metrics": ["CIDEr"]}


@dataclass
class Row:
    task: str
    metric: str
    pretrained: float | None
    scratch: float
    chance: float


def _first_colour(text: str) -> str | None:
    from ..data.shapes import COLOURS

    for word in text.replace(",", " ").replace(":", " ").split():
        if word in COLOURS:
            return word
    return None


def _write_text_classification(data: Path, per_image: int = 2, train_per_class: int | None = None, seed: int = 0) -> None:
    """Our text task on the built-in data: which colour does a caption name first (8 classes)?

    Every caption names a colour; the test captions describe scenes with held-out colour-shape pairs
    ("a red triangle"), so the classifier must read the colour word in new contexts. ``train_per_class``: keep
    that many training captions per colour (a seeded draw), the few-shot setting where a pretrained language
    encoder matters; None keeps all."""
    coco = json.loads((data / "dataset_coco.json").read_text())
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for img in coco["images"]:
        for sent in img["sentences"][:per_image]:
            label = _first_colour(sent["raw"])
            if label is not None:
                rows[img["split"]].append((sent["raw"].replace('"', "'"), label))
    if train_per_class is not None:
        random.Random(seed).shuffle(rows["train"])
        per_label: dict[str, list[tuple[str, str]]] = {}
        for text, label in rows["train"]:
            kept = per_label.setdefault(label, [])
            if len(kept) < train_per_class:
                kept.append((text, label))
        rows["train"] = [r for kept in per_label.values() for r in kept]
    for split, pairs in rows.items():
        lines = [f'"{text}",{label}' for text, label in pairs]
        (data / f"text_classification.{split}.csv").write_text("text,label\n" + "\n".join(lines) + "\n")


def _set_threads(threads: int | None) -> int:
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        threads = int(env) if env and env.isdigit() else 1
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def _pretrain_config(cfg: QuickstartConfig, data: Path, out: Path, seed: int):
    from ..train.config import TrainConfig
    from ..train.pretrain import DataConfig, PretrainConfig

    b, steps = cfg.pretrain_batch, cfg.pretrain_steps
    return PretrainConfig(
        model=cfg.model, vqkd_steps=cfg.vqkd_steps, batch={"text": b, "image": b, "pair": b},
        pair_image_mask_ratio=cfg.pretrain_pair_image_mask, itc_weight=cfg.pretrain_itc_weight,
        crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip, color_jitter=cfg.color_jitter,
        text_tokenizer=str(data / "shapes.spm"),
        data=DataConfig(dir=str(data), builtin=False, text=str(data / "corpus.txt"), image=str(data / "shards"), pair=str(data / "shards"),
                        eval_pairs=str(data / "coco_retrieval.val.jsonl"), num_workers=0, eval_size=cfg.pretrain_eval_size),
        train=TrainConfig(out_dir=str(out), max_steps=steps, lr=cfg.pretrain_lr, min_lr=1e-5, warmup_steps=cfg.pretrain_warmup,
                          betas=(0.9, 0.98), eps=1e-6, log_every=max(1, steps // 40), save_every=0, keep_last=1,
                          seed=seed, progress=cfg.progress),
    )


def quickstart(out_dir: str = "quickstart", fast: bool = False, seed: int = 0,
               config: QuickstartConfig | str | os.PathLike | None = None) -> list[Row]:
    """Run the whole demo; returns the table rows. ``fast``: the smoke preset (tiny data, a few steps).
    ``config``: a :class:`QuickstartConfig`, or a YAML file of overrides on the preset."""
    import multiway

    from ..data.shapes import generate_synthetic_dataset
    from ..dense.builtin import write_dense_data
    from ..tokenizers.text import TextTokenizer
    from ..train import latest_checkpoint
    from ..train.pretrain import ensure_visual_tokenizer, pretrain
    from .evaluation import OtherImages
    from .tasks import DataSettings, EvalSettings, get_task

    if isinstance(config, QuickstartConfig):
        cfg = config
    else:
        cfg = QuickstartConfig.preset("fast" if fast else "full")
        if config is not None:
            cfg = cfg.update(read_yaml_mapping(config))
    t0 = time.time()
    threads = _set_threads(cfg.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "quickstart_config.yaml")
    torch.manual_seed(seed)
    random.seed(seed)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> None:
        timings[name] = round(time.time() - since, 1)
        logger.info("quickstart %s: %.1f s", name, timings[name])

    t = time.time()
    data = generate_synthetic_dataset(out / "data", img_size=cfg.img_size, seed=seed, num_images=cfg.num_images,
                                      num_pairs=cfg.num_pairs, imagenet_per_class=cfg.imagenet_per_class,
                                      vocab_size=cfg.vocab_size, progress=cfg.progress)
    _write_text_classification(data, train_per_class=cfg.text_train_per_class, seed=seed)
    write_dense_data(data)  # COCO instances, ADE20K folders and CoNLL files of the same scenes
    spm = data / "shapes.spm"
    lap("data", t)

    pcfg = _pretrain_config(cfg, data, out / "pretrain", seed)
    t = time.time()
    logger.info("quickstart: visual tokenizer (VQ-KD, pixels teacher, %d steps)", cfg.vqkd_steps)
    ensure_visual_tokenizer(pcfg)
    lap("vqkd", t)
    t = time.time()
    itc = " + image-text contrastive on the pairs" if cfg.pretrain_itc_weight > 0 else ""
    logger.info("quickstart: pretraining %s (%d steps of masked data modeling on texts, images, pairs%s)",
                cfg.model, cfg.pretrain_steps, itc)
    pre_metrics = pretrain(pcfg)
    pretrained = latest_checkpoint(out / "pretrain") / "model.safetensors"
    lap("pretrain", t)
    pretraining = {k[len("eval/"):]: 100.0 * v for k, v in pre_metrics.items() if k.startswith("eval/")}
    if pretraining:
        logger.info("quickstart: held-out masked-token accuracy (majority baseline): %s", _pretraining_summary(pretraining))

    jobs = []
    for task, plan in cfg.tasks.items():
        for init_name, init in (("pretrained", pretrained), ("scratch", None)):
            fields = dict(task=task, data_dir=str(data / plan.data_subdir), out_dir=str(out / "runs" / f"{task}_{init_name}"),
                          model=dict(preset=cfg.model, init=str(init) if init else None), tokenizer=str(spm),
                          batch_size=plan.batch_size, max_text_len=plan.max_text_len or cfg.max_text_len, eval_split=plan.split,
                          crop_scale=list(cfg.crop_scale), hflip=cfg.hflip, options=dict(plan.options))
            fields["train"] = dict(max_steps=plan.steps, lr=plan.lr, warmup_steps=plan.warmup_steps, weight_decay=0.01,
                                   log_every=max(1, plan.steps // 30), save_every=0, keep_last=1, seed=seed)
            jobs.append((task, init_name, fields))
    t = time.time()
    results = _run_finetunes(jobs, cfg, threads)
    lap("finetune+eval (all)", t)

    rows: list[Row] = []
    runs: dict[str, dict[str, Path]] = {}
    extra: dict[str, float] = {}
    tok = TextTokenizer(spm)
    notes: list[str] = []
    for name, plan in cfg.tasks.items():
        task = get_task(name)(plan.options)
        scores: dict[str, float] = {}
        for init_name in ("pretrained", "scratch"):
            result, timing = results[(name, init_name)]
            timings[f"{name}/{init_name}/train"], timings[f"{name}/{init_name}/eval"] = timing["train_s"], timing["eval_s"]
            scores[init_name] = result[task.metric]
            runs.setdefault(name, {})[init_name] = out / "runs" / f"{name}_{init_name}"
        data_settings = DataSettings(str(data / plan.data_subdir), tokenizer=tok, max_text_len=cfg.max_text_len, img_size=cfg.img_size)
        train_set = task.build_dataset("train", data_settings)
        data_settings.labels = task.label_names(train_set)
        test_set = task.build_dataset(plan.split, data_settings)
        rows.append(Row(name, task.metric_label, scores.get("pretrained"), scores["scratch"], task.chance_level(train_set, test_set)))
        for baseline, value in task.baselines(train_set, test_set).items():
            extra[f"{name}_{baseline}"] = value
            notes.append(f"- {name} {task.metric_label} of a trivial predictor, {baseline.replace('_', ' ')}: {value:.1f}")
        if task.image_blind_check:  # how much of the score comes from reading the image
            for init_name in ("pretrained", "scratch"):
                model = multiway.create_model(runs[name][init_name] / "model.safetensors")
                scored = task.evaluate(model, OtherImages(test_set), EvalSettings(batch_size=64))
                extra[f"{name}_{init_name}_other_images"] = scored[task.metric]
            notes.append(f"- {name} {task.metric_label} with each example beside another test example's image(s), i.e. without reading "
                         f"the image: from pretrained {extra[f'{name}_pretrained_other_images']:.1f}, from scratch "
                         f"{extra[f'{name}_scratch_other_images']:.1f}")
        if task.zero_shot_from_pretraining and cfg.pretrain_itc_weight > 0:  # the pretraining's own heads
            model = task.build_model(cfg.model)
            task.load_init(model, str(pretrained))
            extra[f"{name}_zero_shot"] = task.evaluate(model, test_set, EvalSettings(batch_size=64))[task.metric]
            notes.append(f"- {name} {task.metric_label} with the pretraining's heads, before any fine-tuning: "
                         f"{extra[f'{name}_zero_shot']:.1f}")

    t = time.time()
    plot_loss_curves(runs, out / "loss_curves.png")
    if {"coco_captioning", "vqav2", "coco_retrieval"} <= runs.keys():  # the example grid shows these three tasks
        plot_examples(runs, data, tok, out / "examples.png")
    if {"coco_instance_segmentation", "ade20k"} & runs.keys():  # dense predictions on test images
        from ..dense.pictures import plot_dense_examples

        best = lambda task: runs[task].get("pretrained", runs[task]["scratch"]) if task in runs else None  # noqa: E731
        plot_dense_examples(best("coco_instance_segmentation"), best("ade20k"), data, out / "dense_examples.png")
    lap("plots", t)
    minutes = (time.time() - t0) / 60
    table = format_table(rows)
    notes = "\n".join([*notes, *_notes(pretraining, minutes, threads, load)])
    print(table + "\n\n" + notes)
    logger.info("quickstart done in %.1f min; outputs in %s", minutes, out)
    (out / "results.md").write_text(table + "\n\n" + notes + "\n")
    (out / "results.json").write_text(json.dumps({
        "rows": [r.__dict__ for r in rows], "minutes": minutes, "threads": threads, "load_at_start": load,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "timings_s": timings, "pretraining": pretraining, "baselines": extra, "config": to_dict(cfg)}, indent=2))
    return rows


def _finetune_job(task: str, init_name: str, fields: dict[str, Any], threads: int, progress: bool):
    """One fine-tune + evaluation (runs in a worker process when ``workers`` > 1)."""
    from .finetune import FinetuneConfig, finetune
    from .tasks import get_task

    torch.set_num_threads(threads)
    fields = dict(fields)
    fields["train"] = {**fields["train"], "progress": progress}
    logger.info("quickstart %s from %s: fine-tuning %d steps", task, init_name, fields["train"]["max_steps"])
    result = finetune(from_dict(FinetuneConfig, fields), progress=progress)
    timing = json.loads((Path(fields["out_dir"]) / "timing.json").read_text())
    metric = get_task(task).metric
    logger.info("quickstart %s from %s: %s %.1f (train %.0f s, eval %.0f s)", task, init_name, metric, result[metric],
                timing["train_s"], timing["eval_s"])
    return result, timing


def _run_finetunes(jobs: list[tuple[str, str, dict[str, Any]]], cfg: QuickstartConfig, threads: int):
    """All fine-tunes; with ``cfg.workers`` > 1 in that many processes side by side (``threads`` each), longest
    jobs first."""
    workers = min(cfg.workers, len(jobs))
    if workers <= 1:
        return {(t, i): _finetune_job(t, i, f, threads, cfg.progress) for t, i, f in jobs}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cost = lambda job: job[2]["train"]["max_steps"] * cfg.tasks[job[0]].step_cost  # noqa: E731
    ordered = sorted(jobs, key=cost, reverse=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {(t, i): pool.submit(_finetune_job, t, i, f, threads, False) for t, i, f in ordered}
        return {key: fut.result() for key, fut in futures.items()}


def _pretraining_summary(pretraining: dict[str, float]) -> str:
    parts = [f"{s} {pretraining[s + '_acc']:.1f} ({pretraining[s + '_majority']:.1f})"
             for s in ("text", "image", "pair_text") if s + "_acc" in pretraining]
    if "pair_text_shuffled_acc" in pretraining:
        parts.append(f"pair_text beside another pair's image {pretraining['pair_text_shuffled_acc']:.1f}")
    if "itc_i2t_acc" in pretraining:
        parts.append(f"image-text contrastive top-1 in batches of 64: image->text {pretraining['itc_i2t_acc']:.1f}, "
                     f"text->image {pretraining['itc_t2i_acc']:.1f} ({pretraining['itc_chance']:.1f})")
    return ", ".join(parts)


def _notes(pretraining: dict[str, float], minutes: float, threads: int, load: float) -> list[str]:
    lines = []
    if pretraining:
        lines.append("- pretraining, held-out masked-token accuracy (majority-class baseline): " + _pretraining_summary(pretraining))
    # Kernels for another instruction set (AVX2 vs AVX-512) round differently in the last bits, which hundreds of
    # steps grow into different scores: tables are comparable digit for digit only on the same capability.
    lines.append(f"- wall time {minutes:.1f} min, {threads} thread(s), CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
                 f"load average {load:.1f} at the start")
    return lines


def format_table(rows: list[Row]) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| task | metric | from pretrained | from scratch | chance |", "|---|---|---|---|---|"]
    lines += [f"| {r.task} | {r.metric} | {fmt(r.pretrained)} | {fmt(r.scratch)} | {fmt(r.chance)} |" for r in rows]
    return "\n".join(lines)


def plot_loss_curves(runs: dict[str, dict[str, Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train import read_metrics

    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 2.8), squeeze=False)
    for ax, (task, by_init) in zip(axes[0], runs.items()):
        for init, run in by_init.items():
            rows = [r for r in read_metrics(run) if "loss" in r and r.get("loss") == r.get("loss")]
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=init)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_examples(runs: dict[str, dict[str, Path]], data: Path, tok, path: Path, n: int = 6) -> None:
    """A grid of test images with the generated caption (the run's decoding options), a VQA answer and the top
    retrieval hit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from . import predict as P

    best = lambda task: runs[task].get("pretrained", runs[task]["scratch"])  # noqa: E731
    scenes = [json.loads(line) for line in (data / "scenes.test.jsonl").read_text().splitlines()][:n]
    paths = [data / s["image_path"] for s in scenes]
    cap = P.caption(P.load_predictor(best("coco_captioning"), device="cpu"), paths).rows
    vqa_q = "how many shapes are there?"
    vqa = P.answer(P.load_predictor(best("vqav2"), device="cpu"), paths, vqa_q, topk=1).rows
    ret = P.load_predictor(best("coco_retrieval"), device="cpu")
    coco = json.loads((data / "dataset_coco.json").read_text())
    texts = [img["sentences"][0]["raw"] for img in coco["images"] if img["split"] == "test"]
    hits = P.search_image(ret, paths[0], texts, k=1)  # warm check that the reverse direction works
    fig, axes = plt.subplots(1, len(paths), figsize=(2.6 * len(paths), 3.6), squeeze=False)
    for i, (ax, p) in enumerate(zip(axes[0], paths)):
        ax.imshow(Image.open(p))
        ax.axis("off")
        hit = P.search_image(ret, p, texts, k=1).rows[0]["hits"][0]["text"] if i else hits.rows[0]["hits"][0]["text"]
        lines = [f"cap: {cap[i]['caption']}", f"Q: {vqa_q}", f"A: {vqa[i]['answer']}", f"R@1: {hit}"]
        ax.set_title("\n".join(textwrap.fill(line, 42) for line in lines), fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["PRESETS", "QuickstartConfig", "Row", "TaskPlan", "format_table", "quickstart"]
