"""METER/ViLT ``.arrow`` tables (written here in the schema of METER's write_*.py) read and convert to the jsonl indexes."""

from __future__ import annotations

import io
import json

import pytest

pa = pytest.importorskip("pyarrow")
from PIL import Image  # noqa: E402

from multiway.data.io import DataError, DataErrors, read_jsonl  # noqa: E402
from multiway.meter.arrow import convert_arrow, read_arrow, table_kind  # noqa: E402


class CharTokenizer:
    def text_to_ids(self, text: str) -> list[int]:
        return [ord(c) % 97 for c in text]


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buf, format="JPEG")
    return buf.getvalue()


def _write(path, columns: dict) -> str:
    table = pa.Table.from_pydict(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
        writer.write_table(table)  # as METER's write_*.py do
    return str(path)


def test_caption_table_to_retrieval_captioning_and_pretraining(tmp_path):
    arrow = _write(tmp_path / "coco_caption_karpathy_test.arrow", {
        "image": [_png((255, 0, 0)), b"not an image", _jpeg()],
        "caption": [["a red square", "red"], ["broken"], ["grey"]],
        "image_id": ["a.jpg", "b.jpg", "c.jpg"], "split": ["test"] * 3,
    })
    assert table_kind(read_arrow(arrow).column_names) == "caption"
    data = tmp_path / "data"
    rep = convert_arrow(arrow, data, CharTokenizer(), "coco_retrieval", "test")
    assert rep.rows == 3 and rep.errors.count == 1 and "row 1" in rep.errors.summary()
    items = read_jsonl(data / "coco_retrieval.test.jsonl", DataErrors())
    assert [it["image_id"] for it in items] == [0, 0, 1] and items[0]["text_segment"] == CharTokenizer().text_to_ids("a red square")
    assert (data / items[0]["image_path"]).read_bytes() == _png((255, 0, 0)) and items[2]["image_path"].endswith(".jpg")
    convert_arrow(arrow, data, CharTokenizer(), "coco_captioning", "test")
    caps = read_jsonl(data / "coco_captioning.test.jsonl", DataErrors())
    assert [c["text_segment"] for c in caps] == [None, None]
    gt = json.loads((data / "coco_karpathy_test_gt.json").read_text())
    assert [a["caption"] for a in gt["annotations"]] == ["a red square", "red", "grey"]
    convert_arrow(arrow, data, None, "pretraining", "train")
    assert [it["text"] for it in read_jsonl(data / "pretraining.train.jsonl", DataErrors())] == ["a red square", "red", "grey"]
    with pytest.raises(DataError, match="row 1"):
        convert_arrow(arrow, data, CharTokenizer(), "coco_retrieval", "test", on_error="raise")


def test_vqa_table_with_answer_vocabulary(tmp_path):
    arrow = _write(tmp_path / "vqav2_val.arrow", {
        "image": [_png((0, 0, 255)), _png((0, 255, 0))],
        "questions": [["what colour?", "is it blue?"], ["what colour?"]],
        "answers": [[["blue"], ["yes", "no"]], [["green", "blue"]]],
        "answer_labels": [[[0], [1, 2]], [[3, 0]]],
        "answer_scores": [[[1.0], [1.0, 0.3]], [[0.6, 0.3]]],
        "image_id": [1, 2], "question_id": [[10, 11], [20]], "split": ["val", "val"],
    })
    data = tmp_path / "data"
    rep = convert_arrow(arrow, data, CharTokenizer(), "vqav2", "rest_val")
    items = read_jsonl(data / "vqa.rest_val.jsonl", DataErrors())
    want = [(10, [0], [1.0]), (11, [1, 2], [1.0, 0.3]), (20, [3, 0], [0.6, 0.3])]
    assert [(it["qid"], it["labels"], it["scores"]) for it in items] == want
    vocab = {it["answer"]: it["label"] for it in read_jsonl(data / "answer2label.txt", DataErrors())}
    assert vocab == {"blue": 0, "yes": 1, "no": 2, "green": 3} and rep.errors.count == 0


def test_nlvr2_and_snli_tables_and_wrong_targets(tmp_path):
    nlvr = _write(tmp_path / "nlvr2_dev.arrow", {
        "image_0": [_png((1, 2, 3)), _png((4, 5, 6))], "image_1": [_png((7, 8, 9)), _png((1, 1, 1))],
        "questions": [["left has more", "right is red"], ["x"]], "answers": [["True", "False"], ["maybe"]],
        "identifier": ["dev-1-0", "dev-2-0"],
    })
    data = tmp_path / "data"
    rep = convert_arrow(nlvr, data, CharTokenizer(), "nlvr2", "val")
    items = read_jsonl(data / "nlvr2.dev.index.jsonl", DataErrors())
    assert [it["label"] for it in items] == [1, 0] and rep.errors.count == 1  # "maybe" is not an NLVR2 answer
    assert items[0]["image2_path"].endswith("0-img1.png")
    snli = _write(tmp_path / "snli_train.arrow", {
        "image": [_png((3, 3, 3))], "sentences": [[["two dogs run", "animals move"], ["two dogs run", "cats sleep"]]], "labels": [[2, 0]],
    })
    convert_arrow(snli, data, CharTokenizer(), "snli_ve", "train")
    items = read_jsonl(data / "snli_ve.train.jsonl", DataErrors())
    assert [(it["premise"], it["label"]) for it in items] == [("two dogs run", 2), ("two dogs run", 0)]
    with pytest.raises(ValueError, match="a 'snli' table cannot make a 'vqav2' index"):
        convert_arrow(snli, data, CharTokenizer(), "vqav2", "train")
    with pytest.raises(ValueError, match="match no METER table"):
        table_kind(["foo"])
