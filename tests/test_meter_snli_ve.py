"""SNLI-VE as a METER task: METER's .arrow table -> index -> the task interface; it trains and evaluates."""

from __future__ import annotations

import io
import os

import pytest
import torch

pa = pytest.importorskip("pyarrow")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from multiway.downstream.tasks.base import DataSettings, EvalSettings  # noqa: E402
from multiway.meter.arrow import convert_arrow  # noqa: E402
from multiway.meter.config import tiny_config  # noqa: E402
from multiway.meter.model import METERForSNLIVE, METERModel  # noqa: E402
from multiway.meter.snli_ve import SNLIVE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


class WordTokenizer:
    vocab = {w: i + 10 for i, w in enumerate(["red", "green", "blue", "maybe", "a", "thing"])}

    def text_to_ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _snli_arrow(path, n_images: int, seed: int) -> str:
    """Entailment when the hypothesis names the image's colour, contradiction for another colour, neutral for 'maybe'."""
    g = torch.Generator().manual_seed(seed)
    images, sentences, labels = [], [], []
    names = list(COLOURS)
    for _ in range(n_images):
        colour = names[int(torch.randint(3, (1,), generator=g))]
        other = names[(names.index(colour) + 1 + int(torch.randint(2, (1,), generator=g))) % 3]
        images.append(_png(COLOURS[colour]))
        sentences.append([["a photo", f"a {colour} thing"], ["a photo", f"a {other} thing"], ["a photo", "maybe a thing"]])
        labels.append([2, 0, 1])
    table = pa.Table.from_pydict({"image": images, "sentences": sentences, "labels": labels})
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def test_snli_ve_trains_and_evaluates_from_meter_tables(tmp_path):
    data = tmp_path / "snli"
    for split, n, seed in (("train", 16, 0), ("dev", 6, 1)):
        convert_arrow(_snli_arrow(tmp_path / f"snli_{split}.arrow", n, seed), data, WordTokenizer(), "snli_ve", split)
    task = SNLIVE()
    settings = DataSettings(str(data), max_text_len=8, img_size=32, hflip=False, crop_scale=(1.0, 1.0))
    train, dev = task.build_dataset("train", settings), task.build_dataset("val", settings)
    assert len(train) == 48 and len(dev) == 18 and task.num_classes(train) == 3
    assert task.chance_level(train, dev) == pytest.approx(100 / 3)

    torch.manual_seed(3)
    model = task.build_model(METERModel(tiny_config("vit", "embedding")))
    assert isinstance(model, METERForSNLIVE) and model.head[-1].out_features == 3
    before = task.evaluate(model, dev, EvalSettings(batch_size=8))["acc"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        train, batch_size=16, shuffle=True, collate_fn=task.collate, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    losses = []
    for _ in range(20):
        for batch in loader:
            loss, _ = task.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    after = task.evaluate(model, dev, EvalSettings(batch_size=8))["acc"]
    # the hypothesis alone tells neutral apart (it says "maybe"): 2/3 of dev; the rest needs the image and the text
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]) and after >= 66.0 > before, (before, after, losses[:3], losses[-3:])
