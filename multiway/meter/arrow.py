"""METER's (and ViLT's) data: the pyarrow ``.arrow`` tables its ``write_*.py`` scripts make, read with pyarrow and
converted to the official BEiT-3 jsonl indexes, so either model trains on either format.

The tables and their columns (one row per image; text columns hold one list entry per text of that image):

=====================  ==========================================================================  ================
table (``write_*.py``)  columns                                                                     kind
=====================  ==========================================================================  ================
coco / f30k karpathy    ``image`` (bytes), ``caption`` (list[str]), ``image_id``, ``split``           ``caption``
sbu, conceptual         ``image``, ``caption``, ``image_id``, ``split``                               ``caption``
vg                      ``image``, ``caption``, ``width``, ``height``, ``x``, ``y``, ``image_id``       ``caption``
vqav2                   ``image``, ``questions``, ``answers``, ``answer_labels``, ``answer_scores``,  ``vqa``
                        ``image_id``, ``question_id``, ``split``
nlvr2                   ``image_0``, ``image_1``, ``questions``, ``answers`` ("True"/"False"),         ``nlvr2``
                        ``identifier``
snli (SNLI-VE)          ``image``, ``sentences`` (list of [premise, hypothesis]), ``labels``          ``snli``
                        (METER's ids: contradiction 0, neutral 1, entailment 2)
=====================  ==========================================================================  ================

:func:`convert_arrow` writes the images as files under ``<data_dir>/arrow_images/<table>/`` (the indexes point
at files) and one index: ``coco_retrieval`` / ``flickr30k`` / ``coco_captioning`` (caption tables), ``vqav2``
(+ ``answer2label.txt`` rebuilt from the table's answer/label pairs), ``nlvr2``, ``snli_ve`` (``snli_ve.<split>.jsonl``:
``image_path``, ``text_segment`` = the hypothesis, ``premise``, ``label``), or ``pretraining`` (image-text pair
jsonl with ``image_path`` and ``text`` that :mod:`multiway.data.streams` reads). Broken rows (an image that does
not decode, a missing or mismatched text/label list) are skipped and counted under
:class:`multiway.data.io.DataErrors` (``on_error="raise"`` stops at the first).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import VQA_ANSWER_FILE
from ..data.io import DataErrors, index_files, load_image, write_jsonl

TABLE_KINDS: dict[str, tuple[str, ...]] = {
    "vqa": ("image", "questions", "answers", "answer_labels", "answer_scores", "image_id"),
    "nlvr2": ("image_0", "image_1", "questions", "answers", "identifier"),
    "snli": ("image", "sentences", "labels"),
    "caption": ("image", "caption"),
}
#: index task -> the table kind it is made from
TARGETS: dict[str, str] = {
    "coco_retrieval": "caption", "flickr30k": "caption", "coco_captioning": "caption", "pretraining": "caption",
    "vqav2": "vqa", "nlvr2": "nlvr2", "snli_ve": "snli",
}
SNLI_LABELS = ("contradiction", "neutral", "entailment")  # METER's write_snli.py label ids


def _pyarrow():
    try:
        import pyarrow
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("reading METER's .arrow tables needs pyarrow: pip install 'multiway[meter]'") from e
    return pyarrow


def read_arrow(path: str | os.PathLike):
    """A ``pyarrow.Table`` from a ViLT/METER ``.arrow`` file (IPC file format, as ``RecordBatchFileWriter`` writes;
    the stream format is read too)."""
    pa = _pyarrow()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"arrow table not found: {p}")
    try:
        with pa.memory_map(str(p), "r") as source:
            return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        try:
            with pa.memory_map(str(p), "r") as source:
                return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid as e:
            raise ValueError(f"{p}: not an Arrow IPC file or stream ({e})") from e


def table_kind(columns: Sequence[str], where: str = "table") -> str:
    """``caption`` | ``vqa`` | ``nlvr2`` | ``snli`` from the column names (the most specific match)."""
    cols = set(columns)
    for kind, needed in TABLE_KINDS.items():
        if set(needed) <= cols:
            return kind
    raise ValueError(
        f"{where}: columns {sorted(cols)} match no METER table; expected one of "
        + "; ".join(f"{k}: {list(v)}" for k, v in TABLE_KINDS.items())
    )


def iter_rows(table, batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """Rows of a table as Python dicts, a record batch at a time (the image bytes of one batch in memory)."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield from batch.to_pylist()


@dataclass
class ConvertReport:
    """What :func:`convert_arrow` wrote: ``counts`` {file: items}, ``rows`` read, ``errors`` (skipped rows)."""

    counts: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    errors: DataErrors = field(default_factory=lambda: DataErrors("skip"))


def _save_image(data: Any, folder: Path, stem: str) -> str:
    """Check that ``data`` decodes, write it unchanged as ``stem.<format>``; the file name (relative to ``folder``)."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError(f"image is {type(data).__name__}, expected non-empty bytes")
    from PIL import Image

    load_image(bytes(data), where=stem)  # decodes fully, or raises ImageError saying why
    fmt = (Image.open(io.BytesIO(bytes(data))).format or "png").lower()
    name = f"{stem}.{'jpg' if fmt == 'jpeg' else fmt}"
    (folder / name).write_bytes(bytes(data))
    return name


def _texts(row: dict[str, Any], column: str) -> list[str]:
    texts = row.get(column)
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"column {column!r} must be a non-empty list of non-empty strings, got {texts!r:.80}")
    return texts


def convert_arrow(
    arrow_path: str | os.PathLike, data_dir: str | os.PathLike, tokenizer: Any, task: str, split: str,
    on_error: str = "skip",
) -> ConvertReport:
    """Convert one METER ``.arrow`` table to the ``task``'s official jsonl index for ``split`` in ``data_dir``.

    ``tokenizer`` turns text to ids (``text_to_ids``, a :class:`multiway.tokenizers.TextTokenizer`); the
    ``pretraining`` target keeps raw text. Returns a :class:`ConvertReport` (its ``errors.summary()`` lists
    skipped rows).
    """
    if task not in TARGETS:
        raise ValueError(f"task={task!r} is not supported; accepted values: {', '.join(map(repr, TARGETS))}")
    table = read_arrow(arrow_path)
    name = Path(arrow_path).stem
    kind = table_kind(table.column_names, str(arrow_path))
    if kind != TARGETS[task]:
        raise ValueError(f"{arrow_path}: a {kind!r} table cannot make a {task!r} index (that needs a {TARGETS[task]!r} table)")
    data_dir = Path(data_dir)
    folder = data_dir / "arrow_images" / name
    folder.mkdir(parents=True, exist_ok=True)
    rel = folder.relative_to(data_dir).as_posix()
    report = ConvertReport(errors=DataErrors(on_error))
    items: list[dict[str, Any]] = []
    gt: dict[str, list] = {"images": [], "annotations": []}
    answer2label: dict[str, int] = {}
    encode = (lambda text: text) if task == "pretraining" else tokenizer.text_to_ids
    n_images = 0  # images written so far: the running image_id of retrieval indexes
    for i, row in enumerate(iter_rows(table)):
        report.rows += 1
        where = f"{arrow_path} row {i}"
        try:
            if kind == "nlvr2":
                texts, answers = _texts(row, "questions"), row.get("answers") or []
                if len(answers) != len(texts) or any(str(a) not in ("True", "False") for a in answers):
                    raise ValueError(f"'answers' must hold 'True'/'False' per question, got {answers!r:.80}")
                img0 = _save_image(row["image_0"], folder, f"{i}-img0")
                img1 = _save_image(row["image_1"], folder, f"{i}-img1")
                for j, (text, ans) in enumerate(zip(texts, answers)):
                    items.append({"image_path": f"{rel}/{img0}", "image2_path": f"{rel}/{img1}", "text_segment": encode(text),
                                  "label": int(str(ans) == "True"), "identifier": f"{row['identifier']}-{j}"})
                continue
            image = f"{rel}/{_save_image(row['image'], folder, str(i))}"
            if kind == "caption":
                captions = _texts(row, "caption")
                image_id = row.get("image_id", i)
                if task == "coco_captioning" and split != "train":
                    items.append({"image_path": image, "text_segment": None, "image_id": i})
                    gt["images"].append({"id": i})
                    gt["annotations"] += [{"image_id": i, "caption": c, "id": len(gt["annotations"]) + k} for k, c in enumerate(captions)]
                elif task == "pretraining":
                    items += [{"image_path": image, "text": c, "image_id": str(image_id)} for c in captions]
                else:  # retrieval: image_id is the running image index of the split, as the official indexes
                    items += [{"image_path": image, "text_segment": encode(c), "image_id": n_images} for c in captions]
                n_images += 1
                continue
            if kind == "snli":
                pairs, labels = row.get("sentences") or [], row.get("labels") or []
                if len(pairs) != len(labels) or not pairs or any(not isinstance(p, list) or len(p) != 2 for p in pairs):
                    raise ValueError(f"'sentences' must be [premise, hypothesis] pairs, one per label, got {pairs!r:.80}")
                if any(lab not in range(len(SNLI_LABELS)) for lab in labels):
                    raise ValueError(f"'labels' must be in 0..2 ({', '.join(SNLI_LABELS)}), got {labels}")
                items += [
                    {"image_path": image, "text_segment": encode(h), "premise": p, "label": int(lab)} for (p, h), lab in zip(pairs, labels)
                ]
                continue
            # vqa: one item per question; test tables have no answers
            questions = _texts(row, "questions")
            qids = row.get("question_id") or list(range(len(questions)))
            answers, labels, scores = row.get("answers") or [], row.get("answer_labels") or [], row.get("answer_scores") or []
            has_answers = bool(labels)
            if has_answers and not (len(answers) == len(labels) == len(scores) == len(questions)):
                raise ValueError("'answers', 'answer_labels', 'answer_scores' and 'questions' differ in length")
            row_items, row_answers = [], {}
            for j, q in enumerate(questions):
                item = {"image_path": image, "text_segment": encode(q), "labels": None, "scores": None, "qid": qids[j]}
                if has_answers:
                    if len(answers[j]) != len(labels[j]) or len(labels[j]) != len(scores[j]):
                        raise ValueError(f"question {j}: answers/labels/scores differ in length")
                    for a, lab in zip(answers[j], labels[j]):
                        if {**answer2label, **row_answers}.setdefault(a, int(lab)) != int(lab):
                            raise ValueError(f"answer {a!r} has two labels: {answer2label.get(a, row_answers.get(a))} and {lab}")
                        row_answers[a] = int(lab)
                    item["labels"], item["scores"] = [int(x) for x in labels[j]], [float(x) for x in scores[j]]
                row_items.append(item)
            items += row_items
            answer2label.update(row_answers)
        except Exception as e:  # noqa: BLE001 — every broken row goes through the one skip policy
            report.errors.handle(where, e if isinstance(e, Exception) else str(e))
    out_name = _index_name(task, split)
    report.counts[out_name] = write_jsonl(data_dir / out_name, items)
    if task == "coco_captioning" and split != "train":
        import json

        gt_name = f"coco_karpathy_{split}_gt.json"
        (data_dir / gt_name).write_text(json.dumps(gt))
        report.counts[gt_name] = len(gt["images"])
    if answer2label:
        report.counts[VQA_ANSWER_FILE] = write_jsonl(
            data_dir / VQA_ANSWER_FILE, ({"answer": a, "label": lab} for a, lab in sorted(answer2label.items(), key=lambda kv: kv[1]))
        )
    return report


def _index_name(task: str, split: str) -> str:
    if task == "snli_ve":
        return f"snli_ve.{split}.jsonl"
    if task == "pretraining":
        return f"pretraining.{split}.jsonl"
    if task == "vqav2":  # METER's vqav2_{train,val} tables; BEiT-3 names its files vqa.<split>.jsonl
        return f"vqa.{split}.jsonl"
    return index_files(task, split)[0]
