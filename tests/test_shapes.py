import json
import random
from pathlib import Path

import numpy as np
import pytest
from downstream_data import create_dataset

from multiway.data.index_dataset import collate_batch
from multiway.data.shapes import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    Obj,
    Scene,
    captions,
    generate_synthetic_dataset,
    render_scene,
    sample_scene,
    statement_pair,
)
from multiway.tokenizers.text import TextTokenizer

SMALL = dict(num_images=40, img_size=32, num_pairs=20, imagenet_per_class=2, vocab_size=200, shard_size=16,
             progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "d", seed=3, **SMALL)


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_layout_manifest_and_idempotence(synth):
    m = json.loads((synth / "manifest.json").read_text())
    assert m["params"]["num_images"] == 40 and m["params"]["seed"] == 3
    for name in ("coco_retrieval.train.jsonl", "coco_captioning.val.jsonl", "vqa.train.jsonl", "vqa.rest_val.jsonl",
                 "vqa.test.jsonl", "answer2label.txt", "nlvr2.train.index.jsonl", "nlvr2.test-P.index.jsonl",
                 "imagenet/imagenet.train.index.jsonl", "corpus.txt", "shapes.spm", "coco_karpathy_test_gt.json",
                 "dataset_coco.json", "shards/train-000000.tar"):
        assert (synth / name).is_file(), name
    assert m["counts"]["coco_retrieval.train.jsonl"] == 32 * 5  # 5 captions per train image
    assert m["num_shards"] == 10  # 32 train images x 5 captions, 16 samples per shard
    tok = TextTokenizer(synth / "shapes.spm")
    assert tok.vocab_size == m["tokenizer_vocab_size"] <= 1000  # fits the tiny model presets
    stamp = (synth / "images" / "train" / "000000.png").stat().st_mtime_ns
    generate_synthetic_dataset(synth, seed=3, **SMALL)
    assert (synth / "images" / "train" / "000000.png").stat().st_mtime_ns == stamp  # nothing redone


def test_deterministic(synth, tmp_path):
    again = generate_synthetic_dataset(tmp_path / "again", seed=3, **SMALL)
    for name in ("scenes.train.jsonl", "vqa.train.jsonl", "nlvr2.dev.index.jsonl", "corpus.txt"):
        assert (again / name).read_text() == (synth / name).read_text(), name
    from PIL import Image

    for rel in ("images/test/000039.png", "images/train/000001.png", "images/train/000002.png"):
        assert np.array_equal(np.asarray(Image.open(again / rel)), np.asarray(Image.open(synth / rel))), rel


def test_held_out_combinations_only_in_test(synth):
    for split in ("train", "val"):
        for s in _read(synth / f"scenes.{split}.jsonl"):
            assert not any((o["colour"], o["shape"]) in HELD_OUT for o in s["objects"])
    test = _read(synth / "scenes.test.jsonl")
    assert test and all(any((o["colour"], o["shape"]) in HELD_OUT for o in s["objects"]) for s in test)
    corpus = (synth / "corpus.txt").read_text().splitlines()
    held = [f"{c} {s}" for c, s in HELD_OUT]
    # train sentences never name a held-out pair (the vocabulary extras list every pair, with a size word)
    assert not any(h in line for line in corpus if not line.startswith(("a small", "a big")) for h in held)


def test_captions_are_grounded():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng, "train")
        colours = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        for cap in captions(scene, rng):
            words = set(cap.replace(",", " ").replace(":", " ").split())
            assert words & set(COLOURS) <= colours, (cap, scene)
            assert {w for w in words if w in SHAPES} <= shapes, (cap, scene)


def test_rendered_pixels_show_the_objects():
    scene = Scene([Obj("red", "circle", "big", 0.3, 0.3), Obj("blue", "square", "small", 0.75, 0.75)], "dark", 1)
    img = np.asarray(render_scene(scene, 64)).astype(int)
    assert np.abs(img[19, 19] - COLOURS["red"]).max() < 10
    assert np.abs(img[48, 48] - COLOURS["blue"]).max() < 10
    assert img[5, 60].max() < 90  # dark background


def test_vqa_answers_match_the_scenes(synth):
    scenes = {s["image_id"]: s for s in _read(synth / "scenes.train.jsonl")}
    qs = {q["question_id"]: q for q in json.loads((synth / "vqa/questions.train.json").read_text())["questions"]}
    anns = json.loads((synth / "vqa/annotations.train.json").read_text())["annotations"]
    kinds = set()
    for a in anns:
        q, scene = qs[a["question_id"]], scenes[a["image_id"]]
        assert len(a["answers"]) == 10
        kinds.add(a["question_type"])
        if q["question"] == "how many shapes are there?":
            assert a["multiple_choice_answer"] == str(len(scene["objects"]))
        if q["question"].startswith("what color is the "):
            shape = q["question"][len("what color is the "):-1]
            assert a["multiple_choice_answer"] == next(o["colour"] for o in scene["objects"] if o["shape"] == shape)
    assert kinds == {"color", "shape", "count", "position", "yes/no"}


def test_every_reader_runs_on_the_synthetic_data(synth):
    tok = TextTokenizer(synth / "shapes.spm")
    for task, split in (("coco_retrieval", "test"), ("coco_captioning", "train"), ("coco_captioning", "val"),
                        ("vqav2", "train"), ("vqav2", "test"), ("nlvr2", "val")):
        ds = create_dataset(task, synth, split, tokenizer=tok, img_size=32)
        batch = collate_batch([ds[0], ds[1]])
        assert batch["image"].shape == (2, 3, 32, 32), task
    inet = create_dataset("imagenet", synth / "imagenet", "val", img_size=32)
    assert len(inet) == len(COLOURS) * len(SHAPES)  # 2 per class: 1 train, 1 val
    labels = {it["label"] for it in inet.items}
    assert len(labels) == len(COLOURS) * len(SHAPES)
    nlvr = _read(synth / "nlvr2.train.index.jsonl")
    assert 0.3 < np.mean([x["label"] for x in nlvr]) < 0.7


def _statement_truth(text: str, left, right) -> bool:
    """An independent reading of each kind of NLVR2 statement."""
    words = text.split()
    colour = words[-2]
    in_left, in_right = (colour in {o.colour for o in scene.objects} for scene in (left, right))
    if words[0] == "the":  # the left image contains a red shape
        return in_left if words[1] == "left" else in_right
    return {"both": in_left and in_right, "exactly": in_left != in_right, "neither": not (in_left or in_right)}[words[0]]


def test_nlvr2_statements_are_labelled_right_and_do_not_give_away_their_label():
    # Each kind of statement must be true about half the time, or a text-only model solves the task.
    rng = random.Random(0)
    by_kind: dict[str, list[bool]] = {}
    for i in range(900):
        want = i % 2 == 0
        left, right, text = statement_pair(rng, want, "train")
        by_kind.setdefault(" ".join(text.split()[:3]), []).append(want)
        assert _statement_truth(text, left, right) == want, text
    assert set(by_kind) == {"the left image", "the right image", "both images contain", "exactly one image", "neither image has"}
    for kind, labels in by_kind.items():
        assert 0.3 < sum(labels) / len(labels) < 0.7, kind
