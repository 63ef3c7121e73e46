"""Builders of the official BEiT-3 jsonl indexes from the raw public files (COCO/Flickr30k Karpathy splits, VQAv2,
NLVR2, ImageNet class folders, nocaps image info). Each writes its index files under ``data_dir`` and returns
{file name: item count}."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from multiway.constants import VQA_ANSWER_FILE
from multiway.data.io import DataError, DataErrors, read_jsonl, write_jsonl


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.text_to_ids(text)


def read_answer2label(path: str | os.PathLike) -> dict[str, int]:
    """``answer2label.txt`` (JSON lines ``{"answer", "label"}``) -> {answer: label}."""
    errors = DataErrors("raise")
    return {it["answer"]: int(it["label"]) for it in read_jsonl(path, errors, ("answer", "label"))}


def build_karpathy_retrieval_index(data_dir: str | os.PathLike, tokenizer: Any, karpathy_json: str | os.PathLike,
                                   task: str = "coco_retrieval", image_root: str | None = None) -> dict[str, int]:
    """``{task}.{train,val,test}.jsonl`` from a Karpathy split file (``dataset_coco.json`` /
    ``dataset_flickr30k.json``): one item per caption, ``image_id`` = running image index within the split.
    COCO trains on ``train+restval``. Image paths are ``<filepath>/<filename>`` (COCO) or
    ``<image_root or flickr30k-images>/<filename>`` (Flickr). Returns {file: item count}."""
    data = json.loads(Path(karpathy_json).read_text())
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    next_id = {"train": 0, "val": 0, "test": 0}
    for img in data["images"]:
        split = "train" if img["split"] in ("train", "restval") else img["split"]
        if split not in splits:
            continue
        path = _karpathy_path(img, task, image_root)
        for sent in img["sentences"]:
            splits[split].append({"image_path": path, "text_segment": _ids(tokenizer, sent["raw"]),
                                  "image_id": next_id[split]})
        next_id[split] += 1
    return {f"{task}.{s}.jsonl": write_jsonl(Path(data_dir) / f"{task}.{s}.jsonl", items)
            for s, items in splits.items()}


def _karpathy_path(img: Mapping[str, Any], task: str, image_root: str | None) -> str:
    if image_root is not None:
        return f"{image_root}/{img['filename']}"
    if "filepath" in img:
        return f"{img['filepath']}/{img['filename']}"
    return f"{'flickr30k-images' if task == 'flickr30k' else '.'}/{img['filename']}"


def build_coco_captioning_index(data_dir: str | os.PathLike, tokenizer: Any, karpathy_json: str | os.PathLike,
                                image_root: str | None = None, write_gt: bool = True) -> dict[str, int]:
    """``coco_captioning.{train,val,test}.jsonl`` from ``dataset_coco.json``: train one item per caption with
    ``image_id = cocoid``; val/test one item per image with ``text_segment: null``. With ``write_gt`` also the
    caption ground truth ``coco_karpathy_{val,test}_gt.json`` (COCO caption format) for the evaluation."""
    data = json.loads(Path(karpathy_json).read_text())
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    gt: dict[str, dict[str, list]] = {s: {"images": [], "annotations": []} for s in ("val", "test")}
    for img in data["images"]:
        split = "train" if img["split"] in ("train", "restval") else img["split"]
        if split not in out:
            continue
        path = _karpathy_path(img, "coco_captioning", image_root)
        cid = img.get("cocoid", img.get("imgid"))
        if split == "train":
            for sent in img["sentences"]:
                out[split].append({"image_path": path, "text_segment": _ids(tokenizer, sent["raw"]), "image_id": cid})
        else:
            out[split].append({"image_path": path, "text_segment": None, "image_id": cid})
            gt[split]["images"].append({"id": cid})
            for sent in img["sentences"]:
                gt[split]["annotations"].append({"image_id": cid, "caption": sent["raw"],
                                                 "id": len(gt[split]["annotations"])})
    counts = {f"coco_captioning.{s}.jsonl": write_jsonl(Path(data_dir) / f"coco_captioning.{s}.jsonl", items)
              for s, items in out.items()}
    if write_gt:
        for s, g in gt.items():
            (Path(data_dir) / f"coco_karpathy_{s}_gt.json").write_text(json.dumps(g))
    return counts


def build_nocaps_index(data_dir: str | os.PathLike, nocaps_json: str | os.PathLike, split: str = "val",
                       image_root: str | None = None) -> dict[str, int]:
    """``nocaps.{val,test}.jsonl`` from the nocaps image-info file (``nocaps_val_image_info.json``):
    ``image_path = "<split>/<file_name>"``, ``image_id = id``, ``text_segment: null``."""
    data = json.loads(Path(nocaps_json).read_text())
    root = image_root or split
    items = [{"image_path": f"{root}/{img['file_name']}", "text_segment": None, "image_id": img["id"]}
             for img in data["images"]]
    return {f"nocaps.{split}.jsonl": write_jsonl(Path(data_dir) / f"nocaps.{split}.jsonl", items)}


def build_vqa_index(data_dir: str | os.PathLike, tokenizer: Any,
                    splits: Mapping[str, Sequence[tuple[str | os.PathLike, str | os.PathLike | None, str]]],
                    min_answer_count: int = 9, vocab_splits: Sequence[str] | None = None) -> dict[str, int]:
    """VQA indexes + ``answer2label.txt`` from VQAv2-format question/annotation files.

    ``splits`` maps an index name (``train`` -> ``vqa.train.jsonl``) to a list of
    ``(questions_json, annotations_json or None, image_path_template)``; the template is formatted with
    ``image_id`` (e.g. ``"train2014/COCO_train2014_{image_id:012d}.jpg"``). The answer vocabulary is
    ``normalize(multiple_choice_answer)`` over the ``vocab_splits`` (default: every split with annotations)
    kept when seen ``>= min_answer_count`` times, most frequent first. Each question's raw annotator answers are
    counted and scored ``min(1, 0.3*count)``; questions without an in-vocabulary answer are dropped from splits
    with annotations. Returns {file: item count}.
    """
    # lazy: the VQA answer rules live with the metric, and the downstream package imports the data package
    from multiway.downstream.metrics import normalize_vqa_answer, vqa_soft_score

    loaded: dict[str, list[tuple[list[dict], dict[int, dict] | None, str]]] = {}
    for name, parts in splits.items():
        loaded[name] = []
        for q_file, a_file, template in parts:
            questions = json.loads(Path(q_file).read_text())["questions"]
            anns = None
            if a_file is not None:
                anns = {a["question_id"]: a for a in json.loads(Path(a_file).read_text())["annotations"]}
            loaded[name].append((questions, anns, template))
    vocab_from = vocab_splits or [n for n, parts in loaded.items() if any(a is not None for _, a, _ in parts)]
    counter: Counter[str] = Counter()
    for name in vocab_from:
        for _, anns, _ in loaded[name]:
            for a in (anns or {}).values():
                counter[normalize_vqa_answer(a["multiple_choice_answer"])] += 1
    answers = [a for a, c in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_answer_count]
    answer2label = {a: i for i, a in enumerate(answers)}
    data_dir = Path(data_dir)
    counts = {VQA_ANSWER_FILE: write_jsonl(data_dir / VQA_ANSWER_FILE,
                                              ({"answer": a, "label": i} for a, i in answer2label.items()))}
    for name, parts in loaded.items():
        items = []
        for questions, anns, template in parts:
            for q in questions:
                item = {"image_path": template.format(image_id=q["image_id"]),
                        "text_segment": _ids(tokenizer, q["question"]), "labels": None, "scores": None,
                        "qid": q["question_id"]}
                if anns is not None:
                    ann = anns.get(q["question_id"])
                    if ann is None:
                        raise DataError(f"no annotation for question_id {q['question_id']} ({name})")
                    count = Counter(a["answer"] for a in ann["answers"])
                    labels = [answer2label[a] for a in count if a in answer2label]
                    if not labels:
                        continue
                    item["labels"] = labels
                    item["scores"] = [vqa_soft_score(count[a]) for a in count if a in answer2label]
                items.append(item)
        counts[f"vqa.{name}.jsonl"] = write_jsonl(data_dir / f"vqa.{name}.jsonl", items)
    return counts


def build_vqav2_index(data_dir: str | os.PathLike, tokenizer: Any, vqa_dir: str | os.PathLike | None = None,
                      rest_val_images: int = 1000, seed: int = 0) -> dict[str, int]:
    """The official VQAv2 layout: raw files in ``vqa_dir`` (default ``data_dir/vqa``), images under
    ``data_dir/{train2014,val2014,test2015}``. Writes ``vqa.{train,trainable_val,rest_val,test,test-dev}.jsonl``.
    ``rest_val`` = ``rest_val_images`` val2014 images chosen with ``seed`` (the official split is unseeded)."""
    vqa = Path(vqa_dir) if vqa_dir else Path(data_dir) / "vqa"
    q = lambda s: vqa / f"v2_OpenEnded_mscoco_{s}_questions.json"  # noqa: E731
    a = lambda s: vqa / f"v2_mscoco_{s}_annotations.json"  # noqa: E731
    tmpl = lambda s: f"{s}/COCO_{s}_{{image_id:012d}}.jpg"  # noqa: E731
    val_q = json.loads(q("val2014").read_text())["questions"]
    images = sorted({x["image_id"] for x in val_q})
    rest = set(random.Random(seed).sample(images, min(rest_val_images, len(images))))
    tmp = Path(data_dir) / ".vqa_split"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, keep in (("trainable_val", lambda i: i not in rest), ("rest_val", lambda i: i in rest)):
        (tmp / f"{name}_questions.json").write_text(json.dumps(
            {"questions": [x for x in val_q if keep(x["image_id"])]}))
    splits = {
        "train": [(q("train2014"), a("train2014"), tmpl("train2014"))],
        "trainable_val": [(tmp / "trainable_val_questions.json", a("val2014"), tmpl("val2014"))],
        "rest_val": [(tmp / "rest_val_questions.json", a("val2014"), tmpl("val2014"))],
    }
    for name, s in (("test", "test2015"), ("test-dev", "test-dev2015")):
        if q(s).is_file():
            splits[name] = [(q(s), None, tmpl("test2015"))]
    return build_vqa_index(data_dir, tokenizer, splits, vocab_splits=["train", "trainable_val", "rest_val"])


def build_nlvr2_index(data_dir: str | os.PathLike, tokenizer: Any, nlvr_dir: str | os.PathLike,
                      splits: Mapping[str, str] | None = None) -> dict[str, int]:
    """``nlvr2.{train,dev,test-P}.index.jsonl`` from the NLVR2 repo's ``data/{train,dev,test1}.json`` (json
    lines with ``identifier``, ``sentence``, ``label``, ``directory`` for train). Image paths follow the
    official layout: ``images/train/<directory>/<prefix>-img{0,1}.png``, ``dev/<prefix>-img0.png``,
    ``test1/<prefix>-img0.png``, where ``prefix`` is the identifier without its last field."""
    splits = splits or {"train": "train", "dev": "dev", "test-P": "test1"}
    counts = {}
    for index_name, raw in splits.items():
        errors = DataErrors("raise")
        items = []
        for ex in read_jsonl(Path(nlvr_dir) / "data" / f"{raw}.json", errors, ("identifier", "sentence", "label")):
            prefix = ex["identifier"].rsplit("-", 1)[0]
            folder = f"images/train/{ex['directory']}" if raw == "train" else raw
            items.append({"image_path": f"{folder}/{prefix}-img0.png", "image2_path": f"{folder}/{prefix}-img1.png",
                          "text_segment": _ids(tokenizer, ex["sentence"]),
                          "label": 1 if str(ex["label"]).lower() == "true" else 0, "identifier": ex["identifier"]})
        counts[f"nlvr2.{index_name}.index.jsonl"] = write_jsonl(
            Path(data_dir) / f"nlvr2.{index_name}.index.jsonl", items)
    return counts


def build_imagenet_index(data_dir: str | os.PathLike, train_dir: str = "train", val_dir: str = "val") -> dict[str, int]:
    """``imagenet.{train,val}.index.jsonl`` from class folders ``data_dir/<split_dir>/<class>/<image>``; the
    label is the class index over the sorted train folder names. Paths are relative to ``data_dir``."""
    data_dir = Path(data_dir)
    train_root = data_dir / train_dir
    if not train_root.is_dir():
        raise FileNotFoundError(f"ImageNet train folder not found: {train_root}")
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    label = {c: i for i, c in enumerate(classes)}
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    counts = {}
    for name, sub in (("train", train_dir), ("val", val_dir)):
        root = data_dir / sub
        items = []
        for c in sorted(p.name for p in root.iterdir() if p.is_dir()):
            if c not in label:
                raise DataError(f"{root / c}: class folder not present in {train_root}")
            for f in sorted((root / c).iterdir()):
                if f.suffix.lower() in exts:
                    items.append({"image_path": f.relative_to(data_dir).as_posix(), "label": label[c]})
        counts[f"imagenet.{name}.index.jsonl"] = write_jsonl(data_dir / f"imagenet.{name}.index.jsonl", items)
    return counts
