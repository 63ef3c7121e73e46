"""The built-in shapes data in the dense tasks' official formats, written beside the other built-in files.

``write_dense_data(data_dir)`` reads the scenes of :func:`multiway.data.shapes.generate_synthetic_dataset`
(``scenes.<split>.jsonl``, which know where each shape is) and writes:

```
data_dir/
  coco/instances_{train,val,test}.json   COCO instances: one category per shape kind, a box and a mask per
                                         object (polygons for polygon shapes, RLE for circles); file names
                                         relative to data_dir (images/<split>/NNNNNN.png)
  ade20k/images/{training,validation}/NNNNNN.png, ade20k/annotations/.../NNNNNN.png
                                         ADE20K layout; label 1 = background, 2.. = shape kinds, 0 = "other" on
                                         the anti-aliased rim of each shape (ignored under reduce_zero_label)
  conll/{train,val,test}.txt             CoNLL-2003 columns (word POS chunk tag) of the captions, colour words
                                         tagged B-COLOUR, shape words B-SHAPE, the rest O
```

ADE20K has no test split: ``validation`` holds the scenes of the ``test`` split (held-out colour-shape pairs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..data.shapes import COLOURS, SHAPES, Obj, draw_object, object_outline

CATEGORIES = [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]
CONLL_TAGS = ("O", "B-COLOUR", "B-SHAPE")
SEGMENTATION_CLASSES = ("background", *SHAPES)  # after reduce_zero_label: 0 = background, 1.. = shapes
_SHAPE_WORDS = {w: s for s in SHAPES for w in (s, s + "s", s + "es")}
ADE_FOLDERS = {"train": "training", "test": "validation"}


def object_mask(o: Obj, size: int) -> np.ndarray:
    """(size, size) float coverage of ``o`` in [0, 1], drawn at 4x and averaged (as the image's anti-aliasing)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (size * 4, size * 4), 0)
    draw_object(ImageDraw.Draw(canvas), o, size * 4, 255)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _annotation(o: Obj, coverage: np.ndarray, image_id: int, ann_id: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    binary = np.asfortranarray((coverage >= 0.5).astype(np.uint8))
    ys, xs = np.nonzero(binary)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    side = coverage.shape[0]
    if o.shape == "circle":
        rle = mask_utils.encode(binary)
        segmentation: Any = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    else:
        outline = object_outline(o, side)
        segmentation = [[round(float(min(max(v, 0.0), side)), 2) for point in outline for v in point]]
    return {"id": ann_id, "image_id": image_id, "category_id": SHAPES.index(o.shape) + 1, "iscrowd": 0,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(binary.sum()), "segmentation": segmentation}


def conll_tags(caption: str) -> list[tuple[str, str]]:
    """(word, tag) pairs of a caption: colours ``B-COLOUR``, shape words (plurals too) ``B-SHAPE``, else ``O``."""
    pairs = []
    for word in caption.replace(",", " ,").replace(":", " :").split():
        tag = "B-COLOUR" if word in COLOURS else "B-SHAPE" if word in _SHAPE_WORDS else "O"
        pairs.append((word, tag))
    return pairs


def write_dense_data(data_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write the COCO, ADE20K and CoNLL files under ``data_dir`` (a built-in data folder); idempotent unless
    ``force`` (``dense_manifest.json``, written last, marks a complete run). Returns ``data_dir``."""
    from PIL import Image

    out = Path(data_dir)
    done = out / "dense_manifest.json"
    if done.is_file() and not force:
        return out
    if not (out / "scenes.train.jsonl").is_file():
        raise FileNotFoundError(f"{out}: no scenes.train.jsonl; generate the built-in data first (multiway data synth)")
    counts: dict[str, int] = {}
    karpathy = json.loads((out / "dataset_coco.json").read_text())["images"]
    for split in ("train", "val", "test"):
        images, annotations, ann_id = [], [], 1
        ade = ADE_FOLDERS.get(split)
        if ade:
            (out / "ade20k" / "images" / ade).mkdir(parents=True, exist_ok=True)
            (out / "ade20k" / "annotations" / ade).mkdir(parents=True, exist_ok=True)
        with open(out / f"scenes.{split}.jsonl", encoding="utf-8") as f:
            scenes = [json.loads(line) for line in f if line.strip()]
        for scene in scenes:
            path = out / scene["image_path"]
            with Image.open(path) as im:
                width, height = im.size
            images.append({"id": scene["image_id"], "file_name": scene["image_path"], "width": width, "height": height})
            label = np.ones((height, width), np.uint8)  # 1 = background
            for o in (Obj(**d) for d in scene["objects"]):
                coverage = object_mask(o, width)
                annotations.append(_annotation(o, coverage, scene["image_id"], ann_id))
                ann_id += 1
                label[coverage >= 0.5] = 2 + SHAPES.index(o.shape)
                label[(coverage > 0.05) & (coverage < 0.5)] = 0  # the rim: neither shape nor background
            if ade:
                name = path.name
                shutil.copyfile(path, out / "ade20k" / "images" / ade / name)
                Image.fromarray(label, "L").save(out / "ade20k" / "annotations" / ade / name)
        coco = {"info": {"description": "multiway built-in shapes"}, "images": images, "annotations": annotations,
                "categories": CATEGORIES}
        (out / "coco").mkdir(exist_ok=True)
        (out / "coco" / f"instances_{split}.json").write_text(json.dumps(coco))
        counts[f"coco_{split}_images"], counts[f"coco_{split}_annotations"] = len(images), len(annotations)
        lines = ["-DOCSTART- -X- -X- O", ""]
        sentences = 0
        for entry in karpathy:
            if entry["split"] != split:
                continue
            for sentence in entry["sentences"]:
                lines += [f"{w} _ _ {t}" for w, t in conll_tags(sentence["raw"])] + [""]
                sentences += 1
        (out / "conll").mkdir(exist_ok=True)
        (out / "conll" / f"{split}.txt").write_text("\n".join(lines))
        counts[f"conll_{split}_sentences"] = sentences
    done.write_text(json.dumps(counts, indent=1))
    return out


__all__ = ["CATEGORIES", "CONLL_TAGS", "SEGMENTATION_CLASSES", "conll_tags", "object_mask", "write_dense_data"]
