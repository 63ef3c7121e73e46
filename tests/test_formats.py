import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from downstream_data import create_dataset

from multiway.data.index_dataset import collate_batch
from multiway.data.io import DataError, DataErrors
from multiway.data.raw_indexes import (
    build_coco_captioning_index,
    build_imagenet_index,
    build_karpathy_retrieval_index,
    build_nlvr2_index,
    build_nocaps_index,
    build_vqav2_index,
    read_answer2label,
)
from multiway.downstream.tasks.captioning import CaptioningDataset
from multiway.tokenizers.text import TextTokenizer, train_text_tokenizer

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    words = "a red blue green yellow square squares two one image has both images are empty what color how many " \
            "is it odd shape"
    (d / "c.txt").write_text("\n".join([words] * 30))
    return TextTokenizer(train_text_tokenizer([d / "c.txt"], d / "t", vocab_size=60, hard_vocab_limit=False))


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_imagenet_reader():
    ds = create_dataset("imagenet", FIX, "train", img_size=8)
    assert len(ds) == 2
    s = ds[0]
    assert s["image"].shape == (3, 8, 8) and s["label"] == 0
    batch = collate_batch([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["label"].tolist() == [0, 1]
    assert batch["batch_size"] == 2


def test_nlvr2_reader():
    s = create_dataset("nlvr2", FIX, "train", img_size=8)[0]
    assert set(s) == {"image", "image2", "language_tokens", "padding_mask", "label"}
    assert s["language_tokens"][:5] == [0, 5, 6, 7, 2] and s["padding_mask"][:5] == [0] * 5
    assert len(s["language_tokens"]) == 64 and s["padding_mask"][5:] == [1] * 59
    assert not torch.equal(s["image"], s["image2"]) and s["label"] == 1


def test_vqav2_reader_labels_strings_and_test_split(tok):
    with pytest.raises(DataError, match="pass tokenizer"):
        create_dataset("vqav2", FIX, "train", img_size=8, max_len=8)[1]
    ds = create_dataset("vqav2", FIX, "train", img_size=8, max_len=8, tokenizer=tok)
    assert len(ds) == 2  # vqa.train.jsonl + vqa.trainable_val.jsonl
    assert ds.answer2label == {"red": 0, "blue": 1, "green": 2}
    s = ds[0]
    assert s["labels"] == [1.0, 0.0, 0.3] and s["qid"] == 11
    s2 = ds[1]  # a raw-string text_segment, tokenized with the tokenizer
    assert s2["language_tokens"][1:-1][: len(tok.text_to_ids("what color is it?"))] == \
        tok.text_to_ids("what color is it?")[:6]
    assert s2["labels"] == [0.0, 0.6, 0.0]
    t = create_dataset("vqav2", FIX, "test", img_size=8)[0]
    assert "labels" not in t and t["qid"] == 13
    batch = collate_batch([s, s2])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (2, 3)
    assert batch["language_tokens"].shape == (2, 8) and batch["language_tokens"].dtype == torch.long


def test_retrieval_and_flickr_readers(tok):
    ds = create_dataset("coco_retrieval", FIX, "train", img_size=8, tokenizer=tok)
    assert [ds[i]["image_id"] for i in range(3)] == [0, 0, 1]
    assert ds[1]["language_tokens"][1:1 + len(tok.text_to_ids("a red square"))] == tok.text_to_ids("a red square")
    assert ds[2]["image"].shape == (3, 8, 8)  # jpg
    f = create_dataset("flickr30k", FIX, "train", img_size=8)
    assert set(f[0]) == {"image", "language_tokens", "padding_mask", "image_id"}


def test_captioning_reader_masks_officially():
    ds = create_dataset("coco_captioning", FIX, "train", img_size=8, max_len=10, mask_id=99, vocab_size=100,
                        mask_prob=0.6, seed=0)
    s = ds[0]
    assert set(s) == {"image", "image_id", "language_tokens", "masked_tokens", "language_masked_pos", "padding_mask"}
    assert s["image_id"] == 397133
    n = 8  # <s> + 6 + </s>
    assert sum(s["language_masked_pos"]) == int(n * 0.6 + 0.5)
    assert s["language_masked_pos"][0] == 0 and s["language_masked_pos"][n:] == [0, 0]
    assert s == {**ds[0], "image": s["image"]}  # seeded: the same masks each time
    for t, o, m in zip(s["masked_tokens"], s["language_tokens"], s["language_masked_pos"]):
        assert t == o or m
    # unseeded: fresh masks per draw, reproducible under torch.manual_seed (the training loop seeds torch)
    fresh = create_dataset("coco_captioning", FIX, "train", img_size=8, max_len=10, mask_id=99, vocab_size=100, mask_prob=0.6)
    torch.manual_seed(1)
    first = [fresh[0]["language_masked_pos"] for _ in range(8)]
    torch.manual_seed(1)
    assert [fresh[0]["language_masked_pos"] for _ in range(8)] == first
    assert len({tuple(p) for p in first}) > 1
    val = create_dataset("coco_captioning", FIX, "val", img_size=8)[0]
    assert set(val) == {"image", "image_id"} and val["image_id"] == 42
    assert create_dataset("nocaps", FIX, "val", img_size=8)[0]["image_id"] == 7
    with pytest.raises(DataError, match="needs tokenizer"):
        transform = create_dataset("coco_captioning", FIX, "val", img_size=8).transform
        CaptioningDataset(FIX, "train", ["coco_captioning.train.jsonl"], transform)[0]


def test_broken_inputs_raise_with_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"imagenet.val.index.jsonl:4: malformed JSON"):
        create_dataset("imagenet", FIX, "val", img_size=8)
    shutil.copytree(FIX / "images", tmp_path / "images")
    for _name, line, pattern in (
        ("missing", {"image_path": "images/missing.png", "label": 1}, r"x.jsonl:1: image not found: .*missing.png"),
        ("corrupt", {"image_path": "images/corrupt.png", "label": 1}, r"x.jsonl:1: cannot read image .*corrupt.png"),
        ("truncated", {"image_path": "images/truncated.png", "label": 1}, r"cannot read image .*truncated.png"),
    ):
        (tmp_path / "x.jsonl").write_text(json.dumps(line) + "\n")
        ds = create_dataset("imagenet", tmp_path, "train", img_size=8, index=["x.jsonl"])
        with pytest.raises(DataError, match=pattern):
            ds[0]
    (tmp_path / "x.jsonl").write_text(json.dumps({"image_path": "images/red.png"}) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl:1: missing field\(s\) \['label'\]"):
        create_dataset("imagenet", tmp_path, "train", img_size=8, index=["x.jsonl"])
    with pytest.raises(DataError, match=r"vqa.rest_val.jsonl:3: missing field\(s\) \['text_segment'\]"):
        create_dataset("vqav2", FIX, "val", img_size=8)
    nlvr = create_dataset("nlvr2", FIX, "val", img_size=8)
    with pytest.raises(DataError, match="nlvr2.dev.index.jsonl:1: image not found"):
        nlvr[0]
    with pytest.raises(DataError, match="nlvr2.dev.index.jsonl:2: empty text_segment"):
        nlvr[1]
    with pytest.raises(FileNotFoundError, match="flickr30k.val.jsonl"):
        create_dataset("flickr30k", FIX, "val")


def test_broken_inputs_skip_and_count():
    ds = create_dataset("imagenet", FIX, "val", img_size=8, on_error="skip")
    assert len(ds) == 5 and ds.errors.count == 2  # malformed line 4 and missing field line 5 dropped
    assert "imagenet.val.index.jsonl:4" in ds.errors.summary() and ":5:" in ds.errors.summary()
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_batch, num_workers=1)
    errors = DataErrors("skip")
    batches = list(loader)
    assert errors.absorb(batches[0])  # some samples survived
    assert batches[0]["batch_size"] == 2 and batches[0]["label"].tolist() == [0, 2]
    assert errors.count == 3
    text = errors.summary()
    assert "missing.png" in text and "corrupt.png" in text and "truncated.png" in text
    assert not errors.absorb(collate_batch([{"_skipped": "x: bad"}]))  # an all-broken batch
    vqa = create_dataset("vqav2", FIX, "val", img_size=8, on_error="skip")
    assert len(vqa) == 2 and "_skipped" in vqa[1] and "outside [0, 3)" in vqa[1]["_skipped"]
    with pytest.raises(ValueError, match="on_error"):
        DataErrors("ignore")


def test_collate_batch_types():
    b = collate_batch([{"x": 1, "f": 0.5, "ids": [1, 2], "s": "a", "t": torch.zeros(2), "n": None},
                       {"x": 2, "f": 1.5, "ids": [3, 4], "s": "b", "t": torch.ones(2), "n": None}])
    assert b["x"].dtype == torch.long and b["f"].dtype == torch.float32 and b["ids"].shape == (2, 2)
    assert b["s"] == ["a", "b"] and b["t"].shape == (2, 2) and b["n"] == [None, None]


def test_build_karpathy_indexes(tmp_path, tok):
    counts = build_karpathy_retrieval_index(tmp_path, tok, FIX / "raw" / "dataset_coco.json")
    assert counts == {"coco_retrieval.train.jsonl": 3, "coco_retrieval.val.jsonl": 2, "coco_retrieval.test.jsonl": 1}
    train = _read(tmp_path / "coco_retrieval.train.jsonl")
    assert [it["image_id"] for it in train] == [0, 0, 1]  # running index, restval counts as train
    assert train[0]["image_path"] == "val2014/COCO_val2014_000000000042.jpg"
    assert train[0]["text_segment"] == tok.text_to_ids("a red square")
    build_karpathy_retrieval_index(tmp_path, tok, FIX / "raw" / "dataset_flickr30k.json", task="flickr30k")
    assert _read(tmp_path / "flickr30k.train.jsonl")[0]["image_path"] == "flickr30k-images/1000092795.jpg"
    counts = build_coco_captioning_index(tmp_path, tok, FIX / "raw" / "dataset_coco.json")
    assert counts["coco_captioning.train.jsonl"] == 3 and counts["coco_captioning.val.jsonl"] == 1
    assert _read(tmp_path / "coco_captioning.train.jsonl")[2]["image_id"] == 43  # cocoid
    assert _read(tmp_path / "coco_captioning.val.jsonl") == [
        {"image_path": "val2014/COCO_val2014_000000000044.jpg", "text_segment": None, "image_id": 44}]
    gt = json.loads((tmp_path / "coco_karpathy_val_gt.json").read_text())
    assert [a["caption"] for a in gt["annotations"]] == ["green", "a green square"]
    build_nocaps_index(tmp_path, FIX / "raw" / "nocaps_val_image_info.json")
    assert _read(tmp_path / "nocaps.val.jsonl")[1] == {"image_path": "val/0021ae8bc2b40c6c.jpg",
                                                       "text_segment": None, "image_id": 1}


def test_build_vqav2_index_official_layout(tmp_path, tok):
    shutil.copytree(FIX / "raw" / "vqa", tmp_path / "vqa")
    counts = build_vqav2_index(tmp_path, tok, rest_val_images=1)
    # vocabulary: normalize(multiple_choice_answer) over train+val, count >= 9 -> nothing survives at this size;
    # so check the rule through the rebuilt call with a small threshold below
    assert counts["answer2label.txt"] == 0 and counts["vqa.train.jsonl"] == 0
    from multiway.data.raw_indexes import build_vqa_index

    v = tmp_path / "vqa"
    counts = build_vqa_index(tmp_path, tok, {
        "train": [(v / "v2_OpenEnded_mscoco_train2014_questions.json", v / "v2_mscoco_train2014_annotations.json",
                   "train2014/COCO_train2014_{image_id:012d}.jpg")],
        "rest_val": [(v / "v2_OpenEnded_mscoco_val2014_questions.json", v / "v2_mscoco_val2014_annotations.json",
                      "val2014/COCO_val2014_{image_id:012d}.jpg")],
        "test": [(v / "v2_OpenEnded_mscoco_test2015_questions.json", None,
                  "test2015/COCO_test2015_{image_id:012d}.jpg")],
    }, min_answer_count=1)
    a2l = read_answer2label(tmp_path / "answer2label.txt")
    # "Red!" normalises to "red" (2 votes), "two" to "2"; sorted by count then text
    assert list(a2l) == ["red", "2", "maybe", "square"]
    train = _read(tmp_path / "vqa.train.jsonl")
    assert train[0]["image_path"] == "train2014/COCO_train2014_000000000009.jpg"
    assert train[0]["labels"] == [a2l["red"]] and train[0]["scores"] == [1.0]  # raw "Red" is not counted
    assert train[1]["labels"] == [a2l["2"]] and train[1]["scores"] == [pytest.approx(0.9)]  # 3 raw "2"
    val = _read(tmp_path / "vqa.rest_val.jsonl")
    assert val[1]["labels"] == [a2l["square"]] and val[1]["scores"] == [pytest.approx(0.3)]
    test = _read(tmp_path / "vqa.test.jsonl")
    assert test == [{"image_path": "test2015/COCO_test2015_000000000011.jpg",
                     "text_segment": tok.text_to_ids("what color?"), "labels": None, "scores": None, "qid": 6}]
    assert counts["vqa.train.jsonl"] == 3


def test_build_nlvr2_and_imagenet_indexes(tmp_path, tok):
    counts = build_nlvr2_index(tmp_path, tok, FIX / "raw" / "nlvr")
    assert counts == {"nlvr2.train.index.jsonl": 2, "nlvr2.dev.index.jsonl": 1, "nlvr2.test-P.index.jsonl": 1}
    t = _read(tmp_path / "nlvr2.train.index.jsonl")
    assert t[0]["image_path"] == "images/train/12/train-10171-0-img0.png"
    assert t[0]["image2_path"] == "images/train/12/train-10171-0-img1.png"
    assert [x["label"] for x in t] == [1, 0]
    assert _read(tmp_path / "nlvr2.test-P.index.jsonl")[0]["image_path"] == "test1/test1-7-2-img0.png"
    root = tmp_path / "in"
    shutil.copytree(FIX / "raw" / "imagenet", root)
    counts = build_imagenet_index(root)
    assert counts == {"imagenet.train.index.jsonl": 2, "imagenet.val.index.jsonl": 2}
    assert _read(root / "imagenet.val.index.jsonl")[1] == {
        "image_path": "val/n01443537/n01443537_1.JPEG", "label": 1}


def test_transforms():
    from PIL import Image

    from multiway.data.transforms import PretrainTransform, build_transform

    img = Image.new("RGB", (40, 30), (255, 0, 0))
    ev = build_transform("vqav2", is_train=False, img_size=16)(img)
    assert ev.shape == (3, 16, 16)  # squashed, not cropped
    assert torch.allclose(ev[0], torch.ones(16, 16), atol=1e-2) and torch.allclose(ev[1], -torch.ones(16, 16), atol=1e-2)
    assert build_transform("nlvr2", is_train=True, img_size=16, randaug=True)(img).shape == (3, 16, 16)
    inet = build_transform("imagenet", is_train=False, img_size=16, crop_pct=0.875)(img)
    assert inet.shape == (3, 16, 16) and inet[0].mean() == pytest.approx((1 - 0.485) / 0.229, abs=0.05)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    train = build_transform("imagenet", is_train=True, img_size=16)
    torch.manual_seed(0)
    import random as pyrandom

    pyrandom.seed(0)
    np.random.seed(0)
    # timm's rand-m9-mstd0.5-inc1 sometimes draws posterize with 0 bits, which current Pillow rejects
    assert all(train(noisy).shape == (3, 16, 16) for _ in range(1500))
    view, tok_view = PretrainTransform(16, tokenizer_size=8, color_jitter=0.0)(img)
    assert view.shape == (3, 16, 16) and tok_view.shape == (3, 8, 8)
    assert torch.allclose(view, tok_view.mean((1, 2), keepdim=True) * 2 - 1, atol=1e-2)  # same crop, two scalings
    with pytest.raises(ValueError, match="unknown task"):
        build_transform("segmentation", True)


def test_cli_builds_indexes_and_trains_a_tokenizer(tmp_path):
    from multiway.cli import main

    shutil.copytree(FIX / "raw" / "imagenet", tmp_path / "inet")
    assert main(["data", "index", "imagenet", str(tmp_path / "inet")]) == 0
    assert len(_read(tmp_path / "inet" / "imagenet.train.index.jsonl")) == 2
    (tmp_path / "c.txt").write_text("\n".join(["a red square and a blue circle"] * 20))
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path / "t"), "vocab_size=30",
                 "hard_vocab_limit=false"]) == 0
    assert main(["data", "index", "nlvr2", str(tmp_path), "--nlvr-dir", str(FIX / "raw" / "nlvr"),
                 "--tokenizer", str(tmp_path / "t.model")]) == 0
    assert len(_read(tmp_path / "nlvr2.train.index.jsonl")) == 2


def test_training_crop_and_flip_can_be_turned_off(tmp_path):
    # Texts that say "left"/"right" or name a shape a few pixels wide need training views without flips or crops.
    from PIL import Image

    from multiway.data.transforms import build_transform
    from multiway.downstream.tasks import DataSettings, get_task

    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, :4] = 255  # white stripe on the left
    img = Image.fromarray(arr)
    plain = build_transform("coco_retrieval", is_train=True, img_size=16, crop_scale=(1.0, 1.0), hflip=False)
    assert not any("Flip" in type(t).__name__ for t in plain.transforms)
    evaluated = build_transform("coco_retrieval", is_train=False, img_size=16)(img)
    torch.manual_seed(0)
    assert all(torch.allclose(plain(img), evaluated, atol=1e-5) for _ in range(20))
    flipping = build_transform("coco_retrieval", is_train=True, img_size=16, crop_scale=(1.0, 1.0))
    torch.manual_seed(0)
    assert any(flipping(img)[0, :, -1].mean() > 0.9 for _ in range(20))  # the stripe moved to the right

    img.save(tmp_path / "a.png")
    (tmp_path / "coco_retrieval.train.jsonl").write_text(json.dumps({"image_path": "a.png", "text_segment": [5, 6], "image_id": 0}) + "\n")
    task = get_task("coco_retrieval")()
    item = task.build_dataset("train", DataSettings(str(tmp_path), img_size=16, crop_scale=(1.0, 1.0), hflip=False))[0]
    assert torch.allclose(item["image"], evaluated, atol=1e-5)
