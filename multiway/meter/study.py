"""The METER study: pre-train and fine-tune every cell of a (fusion x architecture x objectives x encoders)
grid on one data set, and tabulate task metrics, parameter counts and throughput.

Each cell: build a tiny METER, pre-train it on the data set's image-caption pairs with the cell's objectives,
then fine-tune a copy on each downstream task (VQAv2, NLVR2, retrieval with fusion re-ranking, and captioning
for the encoder-decoder) and evaluate with the shared metrics. Every cell runs once per seed in ``seeds`` (model
init, data order, masking; the data set is the same), and the table reports mean ± std over the seeds. With
``lr_control`` the first cell also runs with the new layers at the encoders' lr (x1), for the paper's
learning-rate claim. A findings table states, for each of the paper's claims (:data:`CLAIMS`), whether the run
supports it, contradicts it or cannot resolve it: a difference counts only when it exceeds the spread (the sum
of the two standard deviations). Results go to ``results.json`` (every run and the aggregates), ``results.md``
and ``results.png`` under ``out_dir``. ``FAST`` is the CI smoke budget (``multiway study meter --fast``).

The "pretrained" text encoders of the grid are real local checkpoints: a tiny BERT trained here with MLM on the
data set's text for ``text_pretrain_steps`` and saved with ``save_pretrained``; the METER model then loads it
with ``AutoModel.from_pretrained(local_dir)`` exactly as it would load ``bert-base-uncased`` from disk.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import check_literals
from ..downstream.evaluation import OtherImages
from ..downstream.tasks import EvalSettings, get_task
from ..downstream.tasks.base import task_options_fields
from ..log import get_logger
from ..train.loop import train
from .config import MeterConfig, tiny_config, tiny_text
from .model import METERForPretraining, count_parameters
from .objectives import TextSpec, load_mim_tokenizer
from .optim import train_config
from .tasks import pretraining_task

# encoder pairs of the grid: name -> (tiny vision encoder, tiny text encoder, text encoder pre-trained locally?)
ENCODERS: dict[str, tuple[str, str, bool]] = {
    "vit+bert_pretrained": ("vit", "bert", True),
    "vit+bert": ("vit", "bert", False),
    "vit+roberta": ("vit", "roberta", False),
    "vit+embedding": ("vit", "embedding", False),
    "swin+bert_pretrained": ("swin", "bert", True),
    "swin+roberta": ("swin", "roberta", False),
    "multiway+bert_pretrained": ("multiway", "bert", True),
    "multiway+embedding": ("multiway", "embedding", False),
}
# objective sets: name -> ObjectiveConfig fields
OBJECTIVES: dict[str, dict[str, Any]] = {
    "mlm+itm": dict(mlm=True, itm=True, mim=False),
    "mlm+itm_hard": dict(mlm=True, itm=True, mim=False, itm_hard_negatives=True),  # ITM negatives by ITC similarity (+ ITC)
    "mlm+itm+mim": dict(mlm=True, itm=True, mim=True),
    "mlm": dict(mlm=True, itm=False, mim=False),
    "itm": dict(mlm=False, itm=True, mim=False),
    "wwm+itm_hard": dict(mlm=True, itm=True, whole_word_masking=True, itm_hard_negatives=True),
    "mlm+itm+mim_vqkd": dict(mlm=True, itm=True, mim=True, mim_target="vqkd", vqkd_tokenizer="vqkd_tiny_patch8_32"),
}
TASKS = ("vqa", "nlvr2", "retrieval", "captioning")
# the grid's task names -> the official task names of the registry (METER's classes: get_task(name, "meter"))
OFFICIAL_TASKS = {"vqa": "vqav2", "nlvr2": "nlvr2", "retrieval": "coco_retrieval", "captioning": "coco_captioning"}
# the cell's identity in the table (the seed is averaged over)
CELL_KEYS = ("fusion", "architecture", "objectives", "encoders", "lr_mult_top")
# the discriminative metrics the claims are judged on
CLAIM_METRICS = (("vqa_score", "VQA"), ("nlvr2_acc", "NLVR2"), ("ret_avg", "retrieval"))
# and, where the claim is not about discriminative tasks alone, how much the pre-trained fusion reads the image: the
# masked-token accuracy on held-out pairs with their images minus beside other images (same masks), in points
IMAGE_GAIN_METRIC = ("mlm_image_gain", "masked words from the image")
# The CI smoke: two seeds, two cells and the lr control, a handful of steps.
FAST: dict[str, Any] = dict(
    fusions=["co_attention", "merged_attention"], architectures=["encoder_only"], objectives=["mlm+itm"], encoders=["vit+embedding"],
    tasks=["vqa", "nlvr2"], seeds=[0, 1], pretrain_steps=2, finetune_steps=2, task_steps={}, text_pretrain_steps=2, max_eval_items=16,
    batch_size=8, num_images=80, num_pairs=60, data_dir="data/meter_builtin_fast",  # its own folder: never the full grid's data
    width=32, workers=1,
)

logger = get_logger(__name__)


@dataclass
class StudyConfig:
    """The grid and the budget of each cell. Defaults: the sized grid of ``configs/meter_study_tiny.yaml`` (one
    pair of cells per claim of the paper, 3 seeds, tiny models, about 20 minutes on 2 CPU cores with two workers)."""

    data_dir: str = "data/meter_builtin"
    out_dir: str = "runs/meter_study"
    fusions: list[str] = field(default_factory=lambda: ["co_attention", "merged_attention"])
    architectures: list[str] = field(default_factory=lambda: ["encoder_only", "encoder_decoder"])
    objectives: list[str] = field(default_factory=lambda: ["mlm+itm_hard"])
    encoders: list[str] = field(default_factory=lambda: ["vit+bert_pretrained", "vit+bert"])
    tasks: list[str] = field(default_factory=lambda: ["vqa", "nlvr2", "retrieval"])
    grid: Literal["product", "one_axis"] = "one_axis"  # one_axis: the first cell, then each other value of one axis at a time
    pretrain_steps: int = 1000
    finetune_steps: int = 400
    task_steps: dict[str, int] = field(default_factory=lambda: {"nlvr2": 300, "retrieval": 150})  # per task, over finetune_steps
    text_pretrain_steps: int = 150
    batch_size: int = 16
    max_len: int = 24
    img_size: int = 32
    width: int = 64  # encoders and fusion (tiny_config's width); at 32 the pre-trained fusion barely read the image
    lr: float = 2e-4  # "bottom" lr; top x5, heads x10 (tiny models from scratch need more than the paper's 1e-5)
    lr_mult_top: float = 5.0
    lr_mult_head: float = 10.0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast needs a GPU
    seed: int = 0  # the data set and the locally pre-trained text encoder
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every cell runs once per seed
    lr_control: bool = True  # also run the first cell with lr_mult_top = lr_mult_head = 1 (the lr claim)
    max_eval_items: int = 256
    num_images: int = 1500  # scenes of the built-in data when it is generated (1,200 train: 6,000 captions)
    num_pairs: int = 6000  # NLVR2 statements of the built-in data (80% train): the two-image task needs thousands
    num_threads: int = 1  # tiny models on a shared CPU: one thread is many times faster than contended ones
    workers: int = 2  # runs side by side in this many processes (num_threads each); the table does not depend on it
    java_caption_metrics: bool = False  # True: the full COCO caption metrics (PTB tokenizer, METEOR; slow)

    def __post_init__(self) -> None:
        from .config import ARCHITECTURES, FUSION_KINDS

        check_literals(self)

        for option, values, accepted in (
            ("fusions", self.fusions, FUSION_KINDS),
            ("architectures", self.architectures, ARCHITECTURES),
            ("objectives", self.objectives, tuple(OBJECTIVES)),
            ("encoders", self.encoders, tuple(ENCODERS)),
            ("tasks", self.tasks, TASKS),
            ("task_steps", list(self.task_steps), TASKS),
        ):
            bad = [v for v in values if v not in accepted]
            if bad:
                raise ValueError(f"study {option}: {bad} not supported; accepted values: {', '.join(accepted)}")
        if not self.seeds:
            raise ValueError("study seeds: empty; give at least one seed (three or more for a spread)")
        if self.workers < 1:
            raise ValueError(f"study workers={self.workers}: expected at least 1 (processes running cells side by side)")


# --- data -------------------------------------------------------------------------------------------------


def ensure_data(data_dir: str | Path, img_size: int = 32, seed: int = 0, num_images: int = 400, num_pairs: int = 600) -> Path:
    """Use ``data_dir`` if it holds the study's index files; otherwise generate the built-in data there
    (:func:`multiway.data.shapes.generate_synthetic_dataset`, at ``img_size`` px). Existing built-in data made
    with other parameters is used as it is, with a warning that names them (the study never overwrites data)."""
    from ..data.shapes import generate_synthetic_dataset

    root = Path(data_dir)
    if (root / "coco_retrieval.train.jsonl").is_file():
        manifest = root / "manifest.json"
        if manifest.is_file():
            made = json.loads(manifest.read_text()).get("params", {})
            wanted = dict(num_images=num_images, num_pairs=num_pairs, img_size=img_size, seed=seed)
            differ = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
            if differ:
                made_with, study_wants = ({k: pair[i] for k, pair in differ.items()} for i in (0, 1))
                logger.warning("--data %s: built-in data made with %s, not the study's %s; using it as it is (a new folder "
                               "generates the study's)", root, made_with, study_wants)
        return root
    if root.exists() and any(root.iterdir()):
        raise FileNotFoundError(
            f"--data {root}: exists but has no coco_retrieval.train.jsonl; point --data at a data set in the "
            "official index format (coco_retrieval, vqa, nlvr2 files) or at a new folder to generate the built-in one"
        )
    return generate_synthetic_dataset(root, num_images=num_images, img_size=img_size, seed=seed, num_pairs=num_pairs, progress=False)


def find_spm(root: Path) -> Path:
    models = sorted(root.glob("*.model")) + sorted(root.glob("*.spm"))
    if not models:
        raise FileNotFoundError(f"{root}: no SentencePiece model (*.model / *.spm) for the text tokenizer")
    return models[0]


@dataclass
class StudyData:
    tokenizer: Any
    spec: TextSpec
    splits: dict[str, Any]  # "<task>/<split>" -> Dataset


def load_study_data(cfg: StudyConfig) -> StudyData:
    from torch.utils.data import Subset

    from ..downstream.tasks import DataSettings
    from ..tokenizers.text import TextTokenizer

    root = ensure_data(cfg.data_dir, cfg.img_size, cfg.seed, cfg.num_images, cfg.num_pairs)
    tok = TextTokenizer(find_spm(root))
    settings = DataSettings(str(root), tokenizer=tok, max_text_len=cfg.max_len, img_size=cfg.img_size)
    splits = {}
    # the pairs of pretraining (retrieval's files) and the priors' data (vqa, nlvr2), then every task of the grid;
    # METER's tasks train on evaluation views by default (no flips: the data talks about places)
    for name in dict.fromkeys(["retrieval", "vqa", "nlvr2", *cfg.tasks]):
        task = get_task(OFFICIAL_TASKS[name], "meter")()
        for split in ("train", "val"):
            ds = task.build_dataset(split, settings)
            if split == "val" and len(ds) > cfg.max_eval_items:
                ds = Subset(ds, range(cfg.max_eval_items))
            splits[f"{name}/{split}"] = ds
    return StudyData(tok, TextSpec.from_tokenizer(tok), splits)


def _collate(samples: list) -> dict:
    from ..data.index_dataset import collate_batch

    batch = collate_batch(samples)
    batch.pop("batch_size", None)
    return batch


# --- a locally pre-trained text encoder -------------------------------------------------------------------


def pretrain_text_encoder(
    out_dir: str | Path, data: StudyData, text_cfg_name: str, steps: int, batch_size: int, seed: int, width: int = 32
) -> Path:
    """MLM-pretrain a tiny transformers encoder on the data set's captions; ``save_pretrained`` to ``out_dir``."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from .objectives import mlm_mask

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    tc = tiny_text(text_cfg_name, width)
    kwargs = dict(tc.kwargs, vocab_size=data.spec.vocab_size, pad_token_id=data.spec.pad_id, max_position_embeddings=tc.max_len + 3)
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(tc.name, **kwargs))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ds = data.splits["retrieval/train"]
    rng = __import__("numpy").random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(ds), (batch_size,), generator=g).tolist()
        batch = _collate([ds[i] for i in idx])
        ids, pad = batch["language_tokens"], batch["padding_mask"]
        inp, labels = mlm_mask(ids, pad, data.spec, 0.15, False, rng)
        loss = model(input_ids=inp, attention_mask=(1 - pad), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.base_model.save_pretrained(out)
    return out


# --- cells ------------------------------------------------------------------------------------------------


def cell_config(
    cfg: StudyConfig, fusion: str, arch: str, objectives: str, encoders: str, data: StudyData, text_dir: Path | None
) -> MeterConfig:
    vision, text, pretrained = ENCODERS[encoders]
    mc = tiny_config(vision, text, fusion, arch, cfg.width, **OBJECTIVES[objectives])
    mc.text.vocab_size = data.spec.vocab_size
    mc.text.max_len = max(mc.text.max_len, cfg.max_len)
    if pretrained:
        mc.text.pretrained = str(text_dir)
    mc.optim.lr, mc.optim.lr_mult_top, mc.optim.lr_mult_head = cfg.lr, cfg.lr_mult_top, cfg.lr_mult_head
    return mc


def run_cell(cfg: StudyConfig, mc: MeterConfig, data: StudyData) -> dict[str, Any]:
    """Pre-train, then fine-tune a copy per task, at ``cfg.seed``; returns the run's metrics."""
    torch.manual_seed(cfg.seed)
    spec = data.spec
    model = METERForPretraining(mc, pad_id=spec.pad_id, bos_id=spec.bos_id, eos_id=spec.eos_id)
    vqkd = load_mim_tokenizer(mc.objectives, model.meter.vision.grid)
    if vqkd is not None:
        model = METERForPretraining(model.meter, mim_classes=vqkd.n_code)
    row: dict[str, Any] = {"params_M": count_parameters(model.meter) / 1e6}
    pt = pretraining_task(data.splits["retrieval/train"], _collate, cfg.batch_size, spec, mc.objectives, vqkd=vqkd)
    t0 = time.perf_counter()
    runs = tempfile.TemporaryDirectory(prefix="meter_cell_")  # the loop's checkpoints/logs; the table keeps the numbers
    res = train(model, pt, train_config(mc.optim, cfg.pretrain_steps, f"{runs.name}/pretrain", cfg.precision, cfg.seed))
    row["pretrain_s"] = time.perf_counter() - t0
    row["samples_per_s"] = res["samples_per_s"]
    row["pretrain_loss"] = res.get("loss", float("nan"))
    row["bad_steps"] = res["bad_steps"]
    if mc.objectives.mlm:
        row.update(masked_words_check(model, data.splits["retrieval/val"], data.spec, mc.objectives, cfg.batch_size, cfg.seed))
    for name in cfg.tasks:
        task_cls = get_task(OFFICIAL_TASKS[name], "meter")
        caption_metrics = {"fast_metrics": not cfg.java_caption_metrics} if "fast_metrics" in task_options_fields(task_cls) else {}
        task = task_cls(caption_metrics)
        if not task.fits(model.meter):
            continue
        train_set, eval_set = data.splits[f"{name}/train"], data.splits[f"{name}/val"]
        tm = task.build_model(copy.deepcopy(model), task.num_classes(train_set))  # a copy: the next task starts afresh
        t = task.train_task(train_set, cfg.batch_size, eval_set=eval_set, eval_settings=EvalSettings(batch_size=cfg.batch_size))
        steps = cfg.task_steps.get(name, cfg.finetune_steps)
        t0 = time.perf_counter()
        r = train(tm, t, train_config(mc.optim, steps, f"{runs.name}/{name}", cfg.precision, cfg.seed))
        row.update({column: r[f"eval/{key}"] for key, column in task.study_columns.items()})
        if task.image_blind_check:  # the same examples, each beside another example's image(s): what the text alone gives
            blind = task.evaluate(tm, OtherImages(eval_set), EvalSettings(batch_size=cfg.batch_size))
            row.update({f"{column}_blind": blind[key] for key, column in task.study_columns.items()})
        row[f"{name}_s"] = time.perf_counter() - t0
        row["bad_steps"] += r["bad_steps"]
    runs.cleanup()
    return row


@torch.no_grad()
def masked_words_check(
    model: METERForPretraining, dataset: Any, spec: TextSpec, objectives: Any, batch_size: int, seed: int
) -> dict[str, float]:
    """How much the pre-trained model reads the image: the masked-token accuracy (MLM, or span corruption for the
    encoder-decoder) on held-out pairs with their images (``mlm_acc``) and with the same masks beside another pair's
    image (``mlm_acc_blind``, :class:`~multiway.downstream.evaluation.OtherImages`), in % (batch accuracies averaged
    over pairs), and their difference ``mlm_image_gain`` in points."""
    from .objectives import pretraining_loss
    from .tasks import _batches

    mlm_only = dataclasses.replace(objectives, itm=False, mim=False)
    was_training = model.training
    model.eval()
    scores = {}
    for key, ds in (("mlm_acc", dataset), ("mlm_acc_blind", OtherImages(dataset))):
        state = torch.get_rng_state()
        torch.manual_seed(seed)  # the same masks for both passes
        hits = total = 0.0
        for batch in _batches(ds, _collate, batch_size):
            _, logs = pretraining_loss(model, batch, spec, mlm_only)
            n = batch["language_tokens"].shape[0]
            hits, total = hits + logs["mlm/acc"] * n, total + n
        torch.set_rng_state(state)
        scores[key] = 100.0 * hits / max(1.0, total)
    model.train(was_training)
    scores["mlm_image_gain"] = scores["mlm_acc"] - scores["mlm_acc_blind"]
    return scores


def run_study(cfg: StudyConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell; write ``results.{json,md,png}`` under ``cfg.out_dir``; return the rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _run_study(cfg, progress)
    finally:
        torch.set_num_threads(threads)


Job = tuple[tuple[str, str, str, str, float], int]  # (cell, seed)


def _run_job(cfg: StudyConfig, job: Job, data: StudyData, text_dirs: dict[str, Path]) -> dict[str, Any]:
    (f, a, o, e, top), seed = job
    cell_cfg = dataclasses.replace(cfg, seed=seed, lr_mult_top=top, lr_mult_head=cfg.lr_mult_head if top == cfg.lr_mult_top else 1.0)
    mc = cell_config(cell_cfg, f, a, o, e, data, text_dirs.get(ENCODERS[e][1]))
    t0 = time.perf_counter()
    run = {"fusion": f, "architecture": a, "objectives": o, "encoders": e, "lr_mult_top": top, "seed": seed}
    run.update(run_cell(cell_cfg, mc, data))
    run["cell_s"] = time.perf_counter() - t0
    return run


_WORKER_DATA: dict[str, StudyData] = {}  # one worker process loads the study's data once


def _worker_job(cfg: StudyConfig, job: Job, text_dirs: dict[str, Path]) -> dict[str, Any]:
    torch.set_num_threads(cfg.num_threads)
    if "data" not in _WORKER_DATA:
        _WORKER_DATA["data"] = load_study_data(cfg)
    return _run_job(cfg, job, _WORKER_DATA["data"], text_dirs)


def _run_study(cfg: StudyConfig, progress: bool) -> list[dict[str, Any]]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_study_data(cfg)
    text_dirs: dict[str, Path] = {}
    for enc in cfg.encoders:
        _, text, pretrained = ENCODERS[enc]
        if pretrained and text not in text_dirs:
            text_dirs[text] = pretrain_text_encoder(
                out / f"text_{text}_pretrained_w{cfg.width}", data, text, cfg.text_pretrain_steps, cfg.batch_size, cfg.seed, cfg.width
            )
    priors = task_priors(data)
    jobs: list[Job] = [(c, s) for c in grid_cells(cfg) for s in cfg.seeds]
    done: dict[int, dict[str, Any]] = {}

    def finished(i: int, run: dict[str, Any]) -> None:
        done[i] = run
        if progress:
            scores = ", ".join(f"{k}={_fmt(v)}" for k, v in run.items() if k not in CELL_KEYS)
            logger.info("meter study %d/%d (run %d) %s %s %s %s lr x%g seed %d: %s", len(done), len(jobs), i + 1, run["fusion"],
                        run["architecture"], run["objectives"], run["encoders"], run["lr_mult_top"], run["seed"], scores)
        runs = [done[k] for k in sorted(done)]  # the grid's order, whatever order the workers finish in
        write_results(aggregate(runs), cfg, out, runs, priors)

    workers = min(cfg.workers, len(jobs))
    if workers <= 1:
        for i, job in enumerate(jobs):
            finished(i, _run_job(cfg, job, data, text_dirs))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_worker_job, cfg, job, text_dirs): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                finished(futures[fut], fut.result())
    return aggregate([done[k] for k in sorted(done)])


def grid_cells(cfg: StudyConfig) -> list[tuple[str, str, str, str, float]]:
    """The cells to run, as (fusion, architecture, objectives, encoders, lr_mult_top).

    ``grid="product"``: every combination of the four axes. ``grid="one_axis"``: the first value of every axis
    (the base cell), then each other value of one axis at a time with the rest at the base, which is every pair
    the findings compare at a fraction of the product's cost. Either way ``lr_control`` adds the first cell with
    the new layers at the encoders' lr.
    """
    if cfg.grid == "product":
        grid = [(f, a, o, e) for e in cfg.encoders for o in cfg.objectives for a in cfg.architectures for f in cfg.fusions]
    else:
        axes = (cfg.fusions, cfg.architectures, cfg.objectives, cfg.encoders)
        base = tuple(values[0] for values in axes)
        grid = [base] + [(*base[:i], v, *base[i + 1 :]) for i, values in enumerate(axes) for v in values[1:]]
    cells = [(*cell, cfg.lr_mult_top) for cell in grid]
    if cfg.lr_control and cfg.lr_mult_top != 1.0:
        cells.append((*cells[0][:4], 1.0))
    return cells


def task_priors(data: StudyData) -> dict[str, float]:
    """What the validation metrics give without looking at the input: NLVR2 accuracy of the training majority class,
    VQA score of always answering the training split's highest-scoring answer, retrieval's average of a random
    ranking (:func:`retrieval_chance`)."""
    from collections import Counter

    def items(ds: Any) -> list[dict[str, Any]]:
        return [ds.dataset.items[i] for i in ds.indices] if hasattr(ds, "indices") else list(ds.items)

    priors: dict[str, float] = {}
    train, val = items(data.splits["nlvr2/train"]), items(data.splits["nlvr2/val"])
    majority = Counter(int(it["label"]) for it in train).most_common(1)[0][0]
    priors["nlvr2_acc"] = 100.0 * sum(int(it["label"]) == majority for it in val) / max(1, len(val))
    pairs = items(data.splits["retrieval/val"]) if "retrieval/val" in data.splits else []
    if pairs:
        priors["ret_avg"] = retrieval_chance([str(it["image_path"]) for it in pairs])
    answer_mass: Counter[int] = Counter()
    for it in items(data.splits["vqa/train"]):
        for label, score in zip(it.get("labels") or [], it.get("scores") or []):
            answer_mass[int(label)] += float(score)
    if answer_mass:
        top = answer_mass.most_common(1)[0][0]
        val_vqa = items(data.splits["vqa/val"])
        got = [dict(zip(it.get("labels") or [], it.get("scores") or [])).get(top, 0.0) for it in val_vqa]
        priors["vqa_score"] = 100.0 * sum(got) / max(1, len(got))
    return priors


def retrieval_chance(caption_images: list[str], ks: tuple[int, ...] = (1, 5, 10)) -> float:
    """The expected retrieval average (mean of IR and TR R@k, in %) of a random ranking, given each caption's image.

    IR: a caption finds its image among ``n_images`` in the top k with probability k / n_images. TR: an image with
    c captions among ``n`` finds one of them in the top k with probability 1 - C(n - c, k) / C(n, k)."""
    from collections import Counter
    from math import comb

    per_image = Counter(caption_images)
    n, n_images = len(caption_images), len(per_image)
    ir = [min(1.0, k / n_images) for k in ks]
    tr = [sum(1 - comb(n - c, k) / comb(n, k) for c in per_image.values()) / n_images for k in ks]
    return 100.0 * (sum(ir) / len(ks) + sum(tr) / len(ks)) / 2


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell: ``<metric>`` = mean over its seeds, ``<metric>_std`` = sample std (0 for one seed), ``seeds``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in CELL_KEYS), []).append(run)
    rows = []
    for key, group in groups.items():
        row: dict[str, Any] = dict(zip(CELL_KEYS, key))
        row["seeds"] = len(group)
        for metric in [k for k, _ in COLUMNS] + ["cell_s", "bad_steps"]:
            values = [r[metric] for r in group if metric in r]
            if len(values) == len(group):
                t = torch.tensor(values, dtype=torch.float64)
                row[metric] = float(t.mean())
                row[f"{metric}_std"] = float(t.std()) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


# --- the paper's claims --------------------------------------------------------------------------------------


def _pretrained_pairs(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    names = {r["encoders"] for r in rows}
    return [(n, n.removesuffix("_pretrained")) for n in sorted(names) if n.endswith("_pretrained") and n[: -len("_pretrained")] in names]


def _claims(rows: list[dict[str, Any]]) -> list[tuple[str, str, list[tuple[Any, Any]], tuple[tuple[str, str], ...]]]:
    """(claim, the axis compared, [(the value the paper favours, the other)], the metrics judged)."""
    tops = sorted({r["lr_mult_top"] for r in rows}, reverse=True)
    with_gain = (*CLAIM_METRICS, IMAGE_GAIN_METRIC)
    return [
        ("co-attention beats merged attention", "fusion", [("co_attention", "merged_attention")], with_gain),
        ("a pretrained text encoder matters", "encoders", _pretrained_pairs(rows), with_gain),
        # the encoder-decoder's masked words are span-corruption targets: not comparable
        ("encoder-only beats encoder-decoder on discriminative tasks", "architecture", [("encoder_only", "encoder_decoder")],
         CLAIM_METRICS),
        ("a larger lr for the new layers helps", "lr_mult_top", [(tops[0], tops[-1])] if len(tops) > 1 else [], with_gain),
    ]


def findings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each claim: every pair of cells that differ only on the claim's axis, on each discriminative metric,
    compared mean against mean; a difference counts when it exceeds the spread (std + std). The finding is
    "supports" / "contradicts" when every resolved comparison agrees, else "cannot resolve"."""
    out = []
    for claim, axis, pairs, metrics in _claims(rows):
        evidence, verdicts = [], []
        for favoured, other in pairs:
            for a in (r for r in rows if r[axis] == favoured):
                match = [b for b in rows if b[axis] == other and all(b[k] == a[k] for k in CELL_KEYS if k != axis)]
                for b in match:
                    for metric, label in metrics:
                        if metric not in a or metric not in b:
                            continue
                        diff, spread = a[metric] - b[metric], a[f"{metric}_std"] + b[f"{metric}_std"]
                        verdict = "supports" if diff > spread else "contradicts" if -diff > spread else "within spread"
                        verdicts.append(verdict)
                        rest = "/".join(str(a[k]) for k in CELL_KEYS if k != axis)
                        evidence.append(f"{label} [{rest}]: {_pm(a, metric)} vs {_pm(b, metric)} ({verdict})")
        resolved = [v for v in verdicts if v != "within spread"]
        if not resolved:
            finding = "cannot resolve" + ("" if verdicts else " (no pair of cells in this grid)")
        elif all(v == resolved[0] for v in resolved):
            finding = resolved[0] if len(resolved) == len(verdicts) else f"{resolved[0]} ({len(resolved)} of {len(verdicts)} resolved)"
        else:
            n_sup = resolved.count("supports")
            finding = f"cannot resolve (mixed: {n_sup} support, {len(resolved) - n_sup} contradict)"
        out.append({"claim": claim, "finding": finding, "evidence": evidence})
    return out


def _pm(row: dict[str, Any], metric: str) -> str:
    return f"{row[metric]:.1f} ± {row[f'{metric}_std']:.1f}"


# --- outputs ----------------------------------------------------------------------------------------------

COLUMNS = [
    ("vqa_score", "VQA score"), ("vqa_score_blind", "VQA, other images"), ("nlvr2_acc", "NLVR2 acc"),
    ("nlvr2_acc_blind", "NLVR2, other images"), ("ir_r@1", "IR R@1"), ("tr_r@1", "TR R@1"),
    ("ret_avg", "Ret. avg (re-ranked)"), ("ret_dual_avg", "Ret. avg (dual only)"), ("cider", "CIDEr"), ("bleu4", "BLEU-4"),
    ("mlm_acc", "Masked words acc"), ("mlm_acc_blind", "Masked words, other images"), ("mlm_image_gain", "Masked words: image gain"),
    ("params_M", "Params (M)"), ("samples_per_s", "Pretrain samples/s"), ("pretrain_loss", "Pretrain loss"),
]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


# task metrics shown as mean ± std; the rest as the mean
SPREAD_COLUMNS = (
    "vqa_score", "vqa_score_blind", "nlvr2_acc", "nlvr2_acc_blind", "ir_r@1", "tr_r@1", "ret_avg", "ret_dual_avg", "cider", "bleu4",
    "mlm_acc", "mlm_acc_blind", "mlm_image_gain",
)


def to_markdown(rows: list[dict[str, Any]], priors: dict[str, float] | None = None) -> str:
    """The cell table (mean ± std over seeds) and the findings table."""
    head = ["Fusion", "Architecture", "Objectives", "Encoders", "Top lr x", "Seeds"] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["fusion"], r["architecture"], r["objectives"], r["encoders"], f"{r['lr_mult_top']:g}", str(r["seeds"])]
        for k, _ in COLUMNS:
            if k not in r:
                cells.append("—")
            elif k in SPREAD_COLUMNS:
                cells.append(f"{_fmt(r[k])} ± {_fmt(r[k + '_std'])}")
            else:
                cells.append(_fmt(r[k]))
        lines.append("| " + " | ".join(cells) + " |")
    if priors:
        lines += ["", "Priors (no input read): " + ", ".join(f"{k} {v:.1f}" for k, v in priors.items())]
    if any(k.endswith("_blind") for r in rows for k in r):
        lines += ["", "\"Other images\": the same validation examples, each beside another example's image(s); a score that "
                  "does not drop there is read from the text alone."]
    lines += ["", "| Paper's claim | Finding | Evidence (paper's side vs the other, mean ± std over seeds) |", "|---|---|---|"]
    for f in findings(rows):
        lines.append(f"| {f['claim']} | {f['finding']} | {'; '.join(f['evidence']) or '—'} |")
    return "\n".join(lines) + "\n"


def write_results(
    rows: list[dict[str, Any]], cfg: StudyConfig, out: Path, runs: list[dict[str, Any]] | None = None,
    priors: dict[str, float] | None = None,
) -> None:
    payload = {"config": dataclasses.asdict(cfg), "rows": rows, "runs": runs or [], "priors": priors or {}, "findings": findings(rows)}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "results.md").write_text(to_markdown(rows, priors))
    plot(rows, out / "results.png", priors)


PLOT_METRICS = (
    ("vqa_score", "VQA score"), ("nlvr2_acc", "NLVR2 acc"), ("ret_avg", "Ret. avg (re-ranked)"), ("cider", "CIDEr"),
    ("mlm_acc", "Masked words acc (pre-training)"),
)


def plot(rows: list[dict[str, Any]], path: Path, priors: dict[str, float] | None = None) -> None:
    """One panel per task metric, one bar per configuration (mean ± std); red diamonds: the image-blind score
    (other images), dashed line: the input-blind prior."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, name) for k, name in PLOT_METRICS if any(k in r for r in rows)]
    short = {"co_attention": "co-attn", "merged_attention": "merged", "encoder_only": "enc-only", "encoder_decoder": "enc-dec"}
    labels = [f"{short[r['fusion']]}/{short[r['architecture']]}/{r['objectives']}/{r['encoders']}/lr x{r['lr_mult_top']:g}" for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 1.2 + 0.28 * len(rows)), squeeze=False)
    colors = ["tab:blue" if r["fusion"] == "co_attention" else "tab:orange" for r in rows]
    for ax, (k, name) in zip(axes[0], metrics):
        vals = [r.get(k, 0.0) for r in rows]
        ax.barh(range(len(rows)), vals, xerr=[r.get(f"{k}_std", 0.0) for r in rows], color=colors)
        blind = [(i, r[f"{k}_blind"]) for i, r in enumerate(rows) if f"{k}_blind" in r]
        if blind:
            ax.scatter([b for _, b in blind], [i for i, _ in blind], marker="D", s=30, color="red", zorder=3, label="other images")
        if priors and k in priors:
            ax.axvline(priors[k], color="gray", linestyle="--", label="prior")
        if blind or (priors and k in priors):
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(name)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels if ax is axes[0][0] else [], fontsize=7)
        ax.invert_yaxis()
    fig.suptitle("METER grid on the built-in data, mean ± std over seeds (blue: co-attention, orange: merged attention)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
