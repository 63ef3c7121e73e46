"""Tiny models and images for the export, index and serving tests: colour squares, a 40-piece tokenizer and
three run folders (retrieval, captioning, VQAv2) in the layout `multiway finetune` writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from downstream_data import NAMES, write_downstream_data

import multiway
from multiway.tokenizers.text import train_text_tokenizer


@dataclass
class ServingData:
    root: Path
    images: Path  # a folder of 8 colour squares (2 per colour)
    tokenizer: Path
    retrieval: Path
    captioner: Path
    vqa: Path


def _run_folder(out: Path, head: str, spm: Path, task: str, labels: list[str] | None = None, options: dict | None = None,
                **kwargs) -> Path:
    torch.manual_seed(0)
    model = multiway.create_model(f"beit3_tiny_patch8_32_{head}", **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    multiway.save_pretrained(model, out / "model.safetensors")
    meta = {"task": task, "model_task": head, "tokenizer": str(spm), "labels": labels, "max_text_len": 16, "options": options or {}}
    (out / "task.json").write_text(json.dumps(meta))
    return out


def make_serving_data(root: Path) -> ServingData:
    corpus = write_downstream_data(root, per_color=2)
    spm = train_text_tokenizer([corpus], root / "spm", vocab_size=40, hard_vocab_limit=False)
    return ServingData(
        root=root,
        images=root / "images" / "train",
        tokenizer=spm,
        retrieval=_run_folder(root / "runs" / "retrieval", "retrieval", spm, "coco_retrieval"),
        captioner=_run_folder(root / "runs" / "captioning", "captioning", spm, "coco_captioning",
                              options={"num_beams": 1, "max_gen_len": 6}),
        vqa=_run_folder(root / "runs" / "vqa", "vqav2", spm, "vqav2", labels=list(NAMES), num_classes=len(NAMES)),
    )
