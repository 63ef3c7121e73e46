"""``multiway quickstart``: built-in data -> tiny pretraining -> fine-tune and evaluate every adaptation mode.

Prints one table (task, metric, from-pretrained, from-scratch, chance) and writes, under ``out_dir``:
``results.json``, ``results.md``, ``loss_curves.png`` and ``examples.png`` (test images with generated
captions, VQA answers and retrieval hits).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# task -> (evaluation split, fine-tuning steps (full, fast), lr)
_PLAN: dict[str, tuple[str, tuple[int, int], float]] = {
    "imagenet": ("val", (150, 6), 2e-3),
    "vqav2": ("val", (150, 6), 1e-3),
    "nlvr2": ("test", (150, 6), 1e-3),
    "coco_retrieval": ("test", (150, 6), 3e-4),
    "coco_captioning": ("test", (200, 6), 1e-3),
    "text_classification": ("test", (100, 6), 1e-3),
}


@dataclass
class Row:
    task: str
    metric: str
    pretrained: float | None
    scratch: float
    chance: float


def _write_text_classification(data: Path) -> None:
    """Our text task on the built-in data: caption -> number of objects in the scene (1, 2 or 3)."""
    coco = json.loads((data / "dataset_coco.json").read_text())
    counts = {}
    for split in ("train", "val", "test"):
        path = data / f"scenes.{split}.jsonl"
        for line in path.read_text().splitlines():
            s = json.loads(line)
            counts[s["image_id"]] = len(s["objects"])
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for img in coco["images"]:
        for sent in img["sentences"][:2]:
            text = sent["raw"].replace('"', "'")
            rows[img["split"]].append(f'"{text}",{counts[img["cocoid"]]}')
    for split, lines in rows.items():
        (data / f"text_classification.{split}.csv").write_text("text,label\n" + "\n".join(lines) + "\n")


def _pretrain(data: Path, out: Path, preset: str, steps: int, seed: int, fast: bool) -> Path:
    """Tiny BEiT-3 pretraining on the built-in data (:func:`multiway.train.pretrain.pretrain`); returns its model file."""
    from ..train.loop import TrainConfig
    from ..train.pretrain import DataConfig, PretrainConfig, pretrain

    batch = 16 if fast else 32
    cfg = PretrainConfig(
        model=preset, vqkd_steps=20 if fast else 150, batch={"text": batch, "image": batch, "pair": batch},
        data=DataConfig(dir=str(data), builtin=False, num_workers=0, eval_size=64),
        train=TrainConfig(out_dir=str(out), max_steps=steps, lr=2e-3, min_lr=1e-5, warmup_steps=max(2, steps // 10),
                          betas=(0.9, 0.98), eps=1e-6, log_every=max(1, steps // 30), save_every=0, keep_last=1,
                          seed=seed, progress=not fast),
    )
    pretrain(cfg)
    from ..train import latest_checkpoint

    return latest_checkpoint(out) / "model.safetensors"


def quickstart(out_dir: str = "quickstart", fast: bool = False, seed: int = 0) -> list[Row]:
    """Run the whole demo; returns the table rows. ``fast``: a smoke version (tiny data, a few steps)."""
    from ..data.shapes import generate_synthetic_dataset
    from .finetune import FinetuneConfig, finetune
    from .tasks import TASKS, build_dataset, chance_level
    from ..tokenizers.text import TextTokenizer

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    random.seed(seed)
    preset = "beit3_tiny_patch8_32"
    data = generate_synthetic_dataset(
        out / "data", img_size=32, seed=seed,
        **(dict(num_images=160, num_pairs=60, imagenet_per_class=4, vocab_size=200) if fast else dict(num_images=1500, num_pairs=600)),
    )
    _write_text_classification(data)
    spm = data / "shapes.spm"
    print("[quickstart] pretraining the tiny model (masked data modeling on text, images and pairs)", flush=True)
    pretrained = _pretrain(data, out / "pretrain", preset, 10 if fast else 600, seed, fast)

    rows: list[Row] = []
    runs: dict[str, dict[str, Path]] = {}
    tok = TextTokenizer(spm)
    for task, (split, steps, lr) in _PLAN.items():
        spec = TASKS[task]
        task_dir = data / "imagenet" if task == "imagenet" else data  # the class folders have their own index
        scores: dict[str, float] = {}
        for init_name, init in (("pretrained", pretrained), ("scratch", None)):
            if init_name == "pretrained" and init is None:
                continue
            run = out / "runs" / f"{task}_{init_name}"
            cfg = FinetuneConfig(
                task=task, data_dir=str(task_dir), out_dir=str(run), model=preset, init=str(init) if init else None,
                tokenizer=str(spm), batch_size=16 if fast else 32, max_text_len=24, eval_split=split, num_beams=2,
                max_gen_len=16, mask_prob=0.5, drop_worst_after=10**9,
                train=dict(max_steps=steps[1] if fast else steps[0], lr=lr, warmup_steps=2 if fast else 15, weight_decay=0.01,
                           log_every=2 if fast else 10, save_every=0, keep_last=1, seed=seed, progress=not fast),
            )
            print(f"[quickstart] {task} from {init_name}: fine-tuning {cfg.train['max_steps']} steps", flush=True)
            result = finetune(cfg, progress=not fast)
            scores[init_name] = result[spec.metric]
            runs.setdefault(task, {})[init_name] = run
        train_set = build_dataset(spec, task_dir, "train", tokenizer=tok, max_len=24, img_size=32)
        kwargs = {"label_names": train_set.label_names} if task == "text_classification" else {}
        test_set = build_dataset(spec, task_dir, split, tokenizer=tok, max_len=24, img_size=32, **kwargs)
        num_classes = len(train_set.label_names) if task == "text_classification" else None
        chance = chance_level(spec, train_set, test_set, num_classes)
        rows.append(Row(task, spec.metric_label, scores.get("pretrained"), scores["scratch"], chance))

    table = format_table(rows)
    print(table)
    minutes = (time.time() - t0) / 60
    print(f"[quickstart] done in {minutes:.1f} min; outputs in {out}")
    (out / "results.md").write_text(table + f"\n\nwall time: {minutes:.1f} min\n")
    (out / "results.json").write_text(json.dumps({"rows": [r.__dict__ for r in rows], "minutes": minutes}, indent=2))
    plot_loss_curves(runs, out / "loss_curves.png")
    plot_examples(runs, data, tok, out / "examples.png")
    return rows


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
    """A grid of test images with the generated caption, a VQA answer and the top retrieval hit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from . import predict as P

    best = lambda task: runs[task].get("pretrained", runs[task]["scratch"])  # noqa: E731
    scenes = [json.loads(line) for line in (data / "scenes.test.jsonl").read_text().splitlines()][:n]
    paths = [data / s["image_path"] for s in scenes]
    cap = P.caption(P.load_predictor(best("coco_captioning"), device="cpu"), paths, num_beams=2, max_len=16).rows
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
        ax.set_title(f"cap: {cap[i]['caption']}\nQ: {vqa_q}\nA: {vqa[i]['answer']}\nR@1: {hit}", fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Row", "format_table", "quickstart"]
