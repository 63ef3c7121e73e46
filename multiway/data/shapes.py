"""Built-in data: a seeded world of coloured shapes, written in the official formats.

``generate_synthetic_dataset(out_dir)`` draws scenes of 1-3 shapes (6 kinds, 8 colours, 2 sizes, positions on
a 3x3 grid of regions, 5 kinds of background) and writes them the way the real benchmarks are distributed,
then builds the official jsonl indexes from those raw files with the same builders as the real data:

```
out_dir/
  manifest.json                      parameters, counts; written last (its presence = complete)
  images/{train,val,test}/NNNNNN.png scenes
  scenes.{train,val,test}.jsonl      ground truth of each scene: objects (colour, shape, size, x, y), background
  dataset_coco.json                  Karpathy-format captions (5 per image)  -> coco_retrieval.*, coco_captioning.*
  coco_karpathy_{val,test}_gt.json   caption ground truth (COCO format)
  vqa/questions.{split}.json, vqa/annotations.{split}.json   VQAv2 format, 10 annotator answers per question
                                     -> vqa.{train,trainable_val,rest_val,test}.jsonl, answer2label.txt
  nlvr/data/{train,dev,test1}.json, images/train/<dir>/..., dev/..., test1/...   NLVR2 format
                                     -> nlvr2.{train,dev,test-P}.index.jsonl
  imagenet/{train,val}/<colour>_<shape>/*.png  one shape per image     -> imagenet.{train,val}.index.jsonl
  corpus.txt                         text corpus (train captions, questions, statements + extra sentences)
  shapes.spm                         SentencePiece model trained on corpus.txt (small vocabulary)
  shards/train-NNNNNN.tar            webdataset shards: one sample per train caption (png, txt caption, json scene)
```

The test split holds out colour-shape combinations (``HELD_OUT``): they never appear in train/val scenes,
captions, questions or statements, and every test scene contains at least one of them.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "cyan": (40, 210, 220), "pink": (245, 130, 190),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SIZES = ("small", "big")
BACKGROUNDS = ("dark", "light", "gradient", "striped", "noisy")
HELD_OUT = {("red", "triangle"), ("blue", "circle"), ("green", "star"), ("yellow", "square"),
            ("purple", "hexagon"), ("orange", "diamond")}
H_WORDS, V_WORDS = ("left", "center", "right"), ("top", "middle", "bottom")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
VERSION = 4


@dataclass
class Obj:
    colour: str
    shape: str
    size: str
    x: float  # centre, in [0, 1]
    y: float

    @property
    def position(self) -> str:
        """One of 9 region names: ``top left``, ``top``, ..., ``center``, ..., ``bottom right``."""
        h, v = H_WORDS[min(2, int(self.x * 3))], V_WORDS[min(2, int(self.y * 3))]
        if v == "middle":
            return "center" if h == "center" else h
        return v if h == "center" else f"{v} {h}"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list[Obj]
    background: str
    bg_seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}


# ----------------------------------------------------------------------------------------------------------------
# sampling and drawing


def _allowed(colour: str, shape: str, split: str) -> bool:
    return split == "test" or (colour, shape) not in HELD_OUT


def sample_scene(rng: random.Random, split: str, max_objects: int = 3, min_objects: int = 1) -> Scene:
    """A scene with non-overlapping objects; test scenes contain at least one held-out colour-shape pair."""
    while True:
        n = rng.randint(min_objects, max_objects)
        objs: list[Obj] = []
        for _ in range(50 * n):
            if len(objs) == n:
                break
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if not _allowed(colour, shape, split):
                continue
            size = rng.choice(SIZES)
            r = _radius(size)
            x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
            if all(math.hypot(x - o.x, y - o.y) > r + _radius(o.size) + 0.02 for o in objs):
                objs.append(Obj(colour, shape, size, round(x, 4), round(y, 4)))
        if len(objs) != n:
            continue
        if split == "test" and not any((o.colour, o.shape) in HELD_OUT for o in objs):
            held = rng.choice(sorted(HELD_OUT))
            objs[0].colour, objs[0].shape = held
        return Scene(objs, rng.choice(BACKGROUNDS), rng.randrange(1 << 30))


def _radius(size: str) -> float:
    return 0.11 if size == "small" else 0.19


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles, radii = [-90, 30, 150], [r] * 3
    elif shape == "square":
        angles, radii = [45, 135, 225, 315], [r] * 4
    elif shape == "diamond":
        angles, radii = [0, 90, 180, 270], [r, r * 0.7, r, r * 0.7]
    elif shape == "hexagon":
        angles, radii = list(range(0, 360, 60)), [r] * 6
    elif shape == "star":
        angles, radii = [-90 + 36 * i for i in range(10)], [r if i % 2 == 0 else r * 0.45 for i in range(10)]
    else:
        raise ValueError(f"not a polygon: {shape}")
    return [(cx + rr * math.cos(math.radians(a)), cy + rr * math.sin(math.radians(a))) for a, rr in zip(angles, radii)]


def render_scene(scene: Scene, size: int = 64):
    """Draw a scene as an RGB PIL image (drawn at 2x and box-downsampled, for smooth edges)."""
    from PIL import Image, ImageDraw

    s = size * 2
    rng = random.Random(scene.bg_seed)
    bg = scene.background
    if bg == "dark":
        g = rng.randint(20, 70)
        img = Image.new("RGB", (s, s), (g, g, g + rng.randint(0, 15)))
    elif bg == "light":
        g = rng.randint(180, 235)
        img = Image.new("RGB", (s, s), (g, g, g - rng.randint(0, 15)))
    elif bg == "gradient":
        a, b = rng.randint(30, 110), rng.randint(130, 220)
        col = Image.linear_gradient("L").resize((s, s)).point(lambda v: a + (b - a) * v // 255)
        img = Image.merge("RGB", (col, col, col))
    elif bg == "striped":
        img = Image.new("RGB", (s, s), (rng.randint(60, 90),) * 3)
        d = ImageDraw.Draw(img)
        step, light = s // rng.choice((6, 8, 10)), (rng.randint(120, 160),) * 3
        for i in range(0, s, 2 * step):
            d.rectangle([i, 0, i + step - 1, s], fill=light)
    else:  # noisy
        import numpy as np

        noise = np.random.default_rng(scene.bg_seed).normal(128, rng.randint(20, 50), (s, s)).clip(0, 255)
        img = Image.fromarray((60 + noise / 3).astype(np.uint8), "L").convert("RGB")
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        draw_object(d, o, s, COLOURS[o.colour])
    return img.reduce(2)


def object_outline(o: Obj, side: float) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    """Where ``o`` is drawn on a ``side`` x ``side`` canvas: a circle's bounding box (x0, y0, x1, y1), else the
    polygon's vertices [(x, y), ...] (the dense tasks' boxes, masks and COCO polygons come from it)."""
    r, cx, cy = _radius(o.size) * side, o.x * side, o.y * side
    if o.shape == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    return _polygon(o.shape, cx, cy, r * (1.25 if o.shape == "square" else 1.0))


def draw_object(draw, o: Obj, side: float, fill) -> None:
    """Draw ``o`` with a PIL ``ImageDraw`` on a ``side`` x ``side`` canvas in ``fill``."""
    outline = object_outline(o, side)
    if o.shape == "circle":
        draw.ellipse(list(outline), fill=fill)
    else:
        draw.polygon(outline, fill=fill)


# ----------------------------------------------------------------------------------------------------------------
# language: captions, questions, statements


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "es" if shape.endswith("s") else shape + "s"


def _relation(a: Obj, b: Obj) -> str:
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def captions(scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
    """``k`` different true descriptions of a scene (colour, shape, size, position, count, relations)."""
    objs, n = scene.objects, len(scene.objects)
    out: list[str] = []
    o = rng.choice(objs)
    out.append(f"a {o.size} {o.colour} {o.shape} on the {o.position} of the image" if o.position != "center"
               else f"a {o.size} {o.colour} {o.shape} in the center of the image")
    listing = ", ".join(f"a {x.colour} {x.shape}" for x in objs[:-1])
    out.append(f"{NUMBER_WORDS[n]} shapes on a {scene.background} background: "
               + (f"{listing} and a {objs[-1].colour} {objs[-1].shape}" if n > 1 else f"a {objs[0].name}"))
    if n >= 2:
        a, b = rng.sample(objs, 2)
        out.append(f"the {a.colour} {a.shape} is {_relation(a, b)} the {b.colour} {b.shape}")
    else:
        out.append(f"a single {o.colour} {o.shape} and nothing else")
    by_colour: dict[str, int] = {}
    for x in objs:
        by_colour[x.colour] = by_colour.get(x.colour, 0) + 1
    c = rng.choice(sorted(by_colour))
    out.append(f"there {'is' if by_colour[c] == 1 else 'are'} {NUMBER_WORDS[by_colour[c]]} {c} "
               f"{'shape' if by_colour[c] == 1 else 'shapes'} in the picture")
    big = [x for x in objs if x.size == "big"]
    if big:
        x = rng.choice(big)
        out.append(f"a big {x.shape} colored {x.colour} near the {x.position}")
    else:
        out.append(f"{'only small shapes' if n > 1 else 'one small shape'}, the largest is a {o.colour} {o.shape}")
    while len(out) < k:
        x = rng.choice(objs)
        out.append(f"a {x.colour} {x.shape} at the {x.position}")
    rng.shuffle(out)
    return out[:k]


def _unique(objs: list[Obj], key) -> list[Obj]:
    vals = [key(o) for o in objs]
    return [o for o, v in zip(objs, vals) if vals.count(v) == 1]


def questions(scene: Scene, rng: random.Random, split: str) -> list[tuple[str, str, str]]:
    """(question, answer, type) about a scene: colour, shape, count, position, yes/no."""
    objs = scene.objects
    qs: list[tuple[str, str, str]] = []
    by_shape = _unique(objs, lambda o: o.shape)
    if by_shape:
        o = rng.choice(by_shape)
        qs.append((f"what color is the {o.shape}?", o.colour, "color"))
    by_colour = _unique(objs, lambda o: o.colour)
    if by_colour:
        o = rng.choice(by_colour)
        qs.append((f"what shape is the {o.colour} object?", o.shape, "shape"))
        qs.append((f"where is the {o.colour} {o.shape}?", o.position, "position"))
    qs.append(("how many shapes are there?", str(len(objs)), "count"))
    c = rng.choice(list(COLOURS))
    qs.append((f"how many {c} shapes are there?", str(sum(o.colour == c for o in objs)), "count"))
    if rng.random() < 0.5:  # balanced yes/no
        o = rng.choice(objs)
        qs.append((f"is there a {o.colour} {o.shape}?", "yes", "yes/no"))
    else:
        for _ in range(20):
            c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if _allowed(c, s, split) and not any(o.colour == c and o.shape == s for o in objs):
                qs.append((f"is there a {c} {s}?", "no", "yes/no"))
                break
    if len(objs) >= 2:
        a, b = rng.sample(objs, 2)
        truth = a.x < b.x
        qs.append((f"is the {a.name} to the left of the {b.name}?", "yes" if truth else "no", "yes/no"))
    return qs


SAME_TYPE_ANSWERS = {"color": list(COLOURS), "shape": list(SHAPES), "count": ["0", "1", "2", "3"],
                     "yes/no": ["yes", "no"],
                     "position": ["top left", "top", "top right", "left", "center", "right", "bottom left",
                                  "bottom", "bottom right"]}


def annotator_answers(answer: str, qtype: str, rng: random.Random, noise: float = 0.1) -> list[str]:
    """Ten annotators: each gives the true answer, or with probability ``noise`` a wrong answer of the same
    type; some write it in another surface form (``Red``, ``two``) that the VQA normalisation folds."""
    out = []
    for _ in range(10):
        a = answer if rng.random() >= noise else rng.choice([x for x in SAME_TYPE_ANSWERS[qtype] if x != answer])
        if rng.random() < 0.1:
            a = {"0": "zero", "1": "one", "2": "two", "3": "three"}.get(a, a.capitalize())
        out.append(a)
    return out


def statement_pair(rng: random.Random, want: bool, split: str) -> tuple[Scene, Scene, str] | None:
    """An NLVR2-style example: (left scene, right scene, statement) whose truth value is ``want``.

    The statement is drawn first and the scene pair is then resampled until the statement has the wanted truth,
    so every kind of statement is true half of the time and the text alone does not predict the label.

    The statements are about the colours in the two images (which image, both, exactly one, neither): at the
    quickstart's 32 px with 8 px patches a tiny ViT tells colours apart but barely shapes (a 2-layer width-64
    model stayed near 1/6 shape accuracy) or counts (statements about numbers of shapes stayed at chance while
    colour statements reached 63-77%)."""
    for _ in range(20):
        kind = rng.randrange(4)
        c = rng.choice(list(COLOURS))
        side = rng.choice(("left", "right"))
        text = (f"the {side} image contains a {c} shape", f"both images contain a {c} shape",
                f"exactly one image has a {c} shape", f"neither image has a {c} shape")[kind]
        for _ in range(100):
            left, right = sample_scene(rng, split), sample_scene(rng, split)
            in_left, in_right = (any(o.colour == c for o in scene.objects) for scene in (left, right))
            truth = (in_left if side == "left" else in_right, in_left and in_right, in_left != in_right,
                     not (in_left or in_right))[kind]
            if truth == want:
                return left, right, text
    return None


# ----------------------------------------------------------------------------------------------------------------
# the generator


@dataclass
class SynthParams:
    num_images: int = 2000  # scenes (captions, retrieval, VQA); split 80/10/10
    num_pairs: int = 600  # NLVR2 statements; split 80/10/10
    imagenet_per_class: int = 24  # single-shape images per colour_shape class (3/4 train, 1/4 val)
    img_size: int = 64
    seed: int = 0
    vocab_size: int = 500  # SentencePiece pieces (the tokenizer has vocab_size + 2 ids)
    shard_size: int = 500  # samples (image-caption pairs) per webdataset shard
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def _split_counts(n: int) -> dict[str, int]:
    val = test = max(1, int(n * 0.1))
    return {"train": n - val - test, "val": val, "test": test}


def _save(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=False, compress_level=1)


def generate_synthetic_dataset(out_dir: str | os.PathLike, num_images: int = 2000, img_size: int = 64,
                               seed: int = 0, num_pairs: int = 600, imagenet_per_class: int = 24,
                               vocab_size: int = 500, shard_size: int = 500, force: bool = False,
                               progress: bool = True) -> Path:
    """Generate the built-in data set under ``out_dir`` (see the module docstring for the layout).

    Idempotent: if ``out_dir/manifest.json`` records the same parameters, nothing is redone. Returns
    ``out_dir``. Defaults (2000 scenes at 64 px) take seconds on 2 CPU cores.
    """
    from multiway.data.io import write_jsonl
    from multiway.data.raw_indexes import (
        build_coco_captioning_index,
        build_imagenet_index,
        build_karpathy_retrieval_index,
        build_nlvr2_index,
        build_vqa_index,
    )
    from multiway.log import progress as progress_bar
    from multiway.tokenizers.text import TextTokenizer, train_text_tokenizer

    params = SynthParams(num_images, num_pairs, imagenet_per_class, img_size, seed, vocab_size, shard_size)
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and not force:
        old = json.loads(manifest_path.read_text())
        if old.get("params") == params.to_dict():
            return out
    out.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        manifest_path.unlink()  # incomplete until rewritten
    t0 = time.time()
    rng = random.Random(seed)
    bar = progress_bar(total=num_images + 2 * num_pairs + imagenet_per_class * len(COLOURS) * len(SHAPES),
               desc="synth images", disable=not progress)

    # scenes -> images, Karpathy captions, VQA raw files, shards
    karpathy, corpus = [], []
    vqa_q: dict[str, list] = {"train": [], "val": [], "test": []}
    vqa_a: dict[str, list] = {"train": [], "val": [], "test": []}
    next_id, qid = 0, 0
    shard_items: list[tuple[str, bytes, str, dict]] = []
    for split, n in _split_counts(num_images).items():
        scenes_out = []
        for _ in range(n):
            scene = sample_scene(rng, split)
            img = render_scene(scene, img_size)
            rel = f"images/{split}/{next_id:06d}.png"
            _save(img, out / rel)
            caps = captions(scene, rng)
            karpathy.append({"filepath": f"images/{split}", "filename": f"{next_id:06d}.png", "cocoid": next_id,
                             "imgid": next_id, "split": split, "sentences": [{"raw": c} for c in caps]})
            scenes_out.append({"image_path": rel, "image_id": next_id, **scene.to_json()})
            for q, a, qtype in questions(scene, rng, split):
                answers = annotator_answers(a, qtype, rng)
                vqa_q[split].append({"image_id": next_id, "question": q, "question_id": qid})
                vqa_a[split].append({"question_id": qid, "image_id": next_id, "question_type": qtype,
                                     "answer_type": "yes/no" if qtype == "yes/no" else "other",
                                     "multiple_choice_answer": a,
                                     "answers": [{"answer": x, "answer_id": i + 1} for i, x in enumerate(answers)]})
                qid += 1
                if split == "train":
                    corpus.append(q)
            if split == "train":
                corpus.extend(caps)
                buf = io.BytesIO()
                img.save(buf, format="PNG", compress_level=1)
                # one sample per caption: the pair stream then sees every description of a scene, not one
                # memorised sentence per image
                shard_items += [(f"{next_id:06d}_{k}", buf.getvalue(), cap, scenes_out[-1]) for k, cap in enumerate(caps)]
            next_id += 1
            bar.update(1)
        write_jsonl(out / f"scenes.{split}.jsonl", scenes_out)
    (out / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": karpathy}))
    (out / "vqa").mkdir(exist_ok=True)
    for split in vqa_q:
        (out / "vqa" / f"questions.{split}.json").write_text(json.dumps({"questions": vqa_q[split]}))
        (out / "vqa" / f"annotations.{split}.json").write_text(json.dumps({"annotations": vqa_a[split]}))

    # NLVR2: pairs of new scenes, balanced true/false statements
    nlvr_dirs = {"train": "train", "val": "dev", "test": "test1"}
    for split, n in _split_counts(num_pairs).items():
        raw = nlvr_dirs[split]
        lines = []
        for i in range(n):
            want = i % 2 == 0
            example = statement_pair(rng, want, split)
            if example is None:
                raise RuntimeError(f"no NLVR2 scene pair found for a {want} statement in {split}")
            left, right, text = example
            directory = i % 10
            ident = f"{raw}-{i}-0-0"
            folder = out / (f"images/train/{directory}" if raw == "train" else raw)
            for j, sc in enumerate((left, right)):
                _save(render_scene(sc, img_size), folder / f"{raw}-{i}-0-img{j}.png")
                bar.update(1)
            lines.append({"identifier": ident, "sentence": text, "label": "True" if want else "False",
                          "directory": directory, "left": left.to_json(), "right": right.to_json()})
            if split == "train":
                corpus.append(text)
        write_jsonl(out / "nlvr" / "data" / f"{raw}.json", lines)

    # ImageNet-style class folders: one shape per image, class = <colour>_<shape>
    for colour in COLOURS:
        for shape in SHAPES:
            for i in range(imagenet_per_class):
                split = "train" if i < imagenet_per_class * 3 // 4 else "val"
                size = rng.choice(SIZES)
                r = _radius(size)
                scene = Scene([Obj(colour, shape, size, rng.uniform(r, 1 - r), rng.uniform(r, 1 - r))],
                              rng.choice(BACKGROUNDS), rng.randrange(1 << 30))
                _save(render_scene(scene, img_size), out / "imagenet" / split / f"{colour}_{shape}" / f"{i:04d}.png")
                bar.update(1)
    bar.close()

    # text corpus + tokenizer (extra sentences cover every word the grammar can produce, held-out pairs too)
    extra = [f"a {s} {c} {sh}" for c in COLOURS for sh in SHAPES for s in SIZES]
    extra += [f"{NUMBER_WORDS[k]} {_plural(sh, k)}" for sh in SHAPES for k in range(5)]
    extra += [f"the {p} of the image" for p in SAME_TYPE_ANSWERS["position"]]
    corpus_lines = corpus + extra
    (out / "corpus.txt").write_text("\n".join(corpus_lines) + "\n")
    # Whole-word pieces: the grammar has a small closed vocabulary, and subword fragments ("p ur p le") made
    # captions 2-3x longer and much harder to generate at tiny scale.
    spm_path = train_text_tokenizer([out / "corpus.txt"], out / "shapes", vocab_size=vocab_size, seed=seed,
                                    hard_vocab_limit=False, model_type="word")
    os.replace(spm_path, out / "shapes.spm")
    vocab_file = spm_path.with_suffix(".vocab")
    if vocab_file.exists():
        os.replace(vocab_file, out / "shapes.vocab")
    tok = TextTokenizer(out / "shapes.spm")

    # official indexes, built from the raw files by the same builders as the real data
    counts: dict[str, int] = {}
    counts.update(build_karpathy_retrieval_index(out, tok, out / "dataset_coco.json", task="coco_retrieval"))
    counts.update(build_coco_captioning_index(out, tok, out / "dataset_coco.json"))
    vqa = out / "vqa"
    tmpl = lambda s: f"images/{s}/{{image_id:06d}}.png"  # noqa: E731
    counts.update(build_vqa_index(out, tok, {
        "train": [(vqa / "questions.train.json", vqa / "annotations.train.json", tmpl("train"))],
        "trainable_val": [],
        "rest_val": [(vqa / "questions.val.json", vqa / "annotations.val.json", tmpl("val"))],
        "test": [(vqa / "questions.test.json", vqa / "annotations.test.json", tmpl("test"))],
    }, min_answer_count=1, vocab_splits=["train", "rest_val"]))
    counts.update(build_nlvr2_index(out, tok, out / "nlvr"))
    counts.update(build_imagenet_index(out / "imagenet"))

    # webdataset shards of the train scenes (for the pretraining streams)
    (out / "shards").mkdir(exist_ok=True)
    num_shards = 0
    for s in range(0, len(shard_items), shard_size):
        path = out / "shards" / f"train-{s // shard_size:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, png, cap, meta in shard_items[s:s + shard_size]:
                for ext, data in (("png", png), ("txt", cap.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        num_shards += 1

    manifest = {"params": params.to_dict(), "counts": counts, "num_shards": num_shards,
                "tokenizer": "shapes.spm", "tokenizer_vocab_size": tok.vocab_size,
                "held_out": sorted(f"{c}_{s}" for c, s in HELD_OUT), "seconds": round(time.time() - t0, 1)}
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return out
