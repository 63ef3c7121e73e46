"""A tiny downstream data set in the official BEiT-3 index formats, written for tests (colour squares)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
NAMES = list(COLORS)


def _image(path: Path, color: str, size: int = 32, shade: int = 0) -> None:
    r, g, b = COLORS[color]
    im = Image.new("RGB", (size, size), (40 + shade, 40, 40))
    im.paste((r, g, b), (4, 4, size - 4, size - 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_downstream_data(root: Path, per_color: int = 4) -> Path:
    """Writes images plus index files for every task into ``root``; returns the tokenizer corpus path."""
    root.mkdir(parents=True, exist_ok=True)
    items = []  # (split, rel path, color)
    for split in ("train", "val"):
        for c in NAMES:
            for k in range(per_color):
                rel = f"images/{split}/{c}_{k}.png"
                _image(root / rel, c, shade=10 * k)
                items.append((split, rel, c))
    for split in ("train", "val"):
        rows = [(rel, c) for s, rel, c in items if s == split]
        _jsonl(root / f"imagenet.{split}.index.jsonl", [{"image_path": r, "label": NAMES.index(c)} for r, c in rows])
        vqa_file = "vqa.train.jsonl" if split == "train" else "vqa.rest_val.jsonl"
        _jsonl(root / vqa_file, [{"image_path": r, "text_segment": "what color is the square", "labels": [NAMES.index(c)],
                                  "scores": [1.0], "qid": i} for i, (r, c) in enumerate(rows)])
        nl_file = "nlvr2.train.index.jsonl" if split == "train" else "nlvr2.dev.index.jsonl"
        nl = []
        for i, (r, c) in enumerate(rows):
            r2, c2 = rows[(i * 5 + 1) % len(rows)]
            nl.append({"image_path": r, "image2_path": r2, "text_segment": f"both squares are {c}", "label": int(c2 == c),
                       "identifier": f"{split}-{i}"})
            nl.append({"image_path": r, "image2_path": r, "text_segment": f"both squares are {c}", "label": 1,
                       "identifier": f"{split}-{i}b"})
        _jsonl(root / nl_file, nl)
        for task in ("coco_retrieval", "flickr30k"):
            _jsonl(root / f"{task}.{split}.jsonl", [{"image_path": r, "text_segment": f"a {c} square", "image_id": i}
                                                    for i, (r, c) in enumerate(rows)])
        if split == "train":
            _jsonl(root / "coco_captioning.train.jsonl", [{"image_path": r, "text_segment": f"a {c} square", "image_id": i}
                                                          for i, (r, c) in enumerate(rows)])
        else:
            for task, gt in (("coco_captioning", "coco_karpathy_val_gt.json"), ("nocaps", "nocaps_val_gt.json")):
                _jsonl(root / f"{task}.val.jsonl",
                       [{"image_path": r, "text_segment": None, "image_id": i} for i, (r, c) in enumerate(rows)])
                anns = [{"image_id": i, "id": i, "caption": f"a {c} square"} for i, (r, c) in enumerate(rows)]
                (root / gt).write_text(json.dumps({"annotations": anns, "images": [{"id": i} for i in range(len(rows))]}))
        tc = ["text,label"] + [f"the {c} one,{c}" for c in NAMES for _ in range(per_color)]
        (root / f"text_classification.{split}.csv").write_text("\n".join(tc) + "\n")
    (root / "vqa.trainable_val.jsonl").write_text("")  # the official train split reads both files
    (root / "answer2label.txt").write_text("".join(json.dumps({"answer": c, "label": i}) + "\n" for i, c in enumerate(NAMES)))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join([f"a {c} square" for c in NAMES] + [f"both squares are {c}" for c in NAMES]
                                + ["what color is the square"] + [f"the {c} one" for c in NAMES]) + "\n")
    return corpus


def create_dataset(task: str, root, split: str, img_size: int = 224, tokenizer=None, max_len: int = 64, on_error: str = "raise",
                   index=None, **dataset_kwargs):
    """A task's dataset of ``split`` through the task interface; ``index`` (other index files) and
    ``dataset_kwargs`` (e.g. captioning's ``mask_id``) build the task's dataset class directly."""
    from multiway.downstream.tasks import DataSettings, get_task
    from multiway.downstream.tasks.captioning import CaptioningDataset
    from multiway.downstream.tasks.imagenet import ImageNetDataset

    t = get_task(task)()
    data = DataSettings(str(root), tokenizer=tokenizer, max_text_len=max_len, img_size=img_size, on_error=on_error)
    if index is None and not dataset_kwargs:
        return t.build_dataset(split, data)
    cls = {"imagenet": ImageNetDataset, "coco_captioning": CaptioningDataset}[task]
    return cls(root, split, index or t.index_files(split), t.image_transform(split, data), tokenizer=tokenizer, max_len=max_len,
               on_error=on_error, **dataset_kwargs)
