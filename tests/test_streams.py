import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from multiway.data.index_dataset import collate_batch
from multiway.data.io import DataError
from multiway.data.streams import ImageStream, PairStream, TextStream, expand_source
from multiway.data.transforms import PretrainTransform
from multiway.tokenizers.text import TextTokenizer, train_text_tokenizer

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "c.txt").write_text("\n".join(["a red square", "a blue circle", "caption number one two three"] * 20))
    return TextTokenizer(train_text_tokenizer([d / "c.txt"], d / "t", vocab_size=40, hard_vocab_limit=False))


def _png(colour=(200, 10, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, s in enumerate(samples):
            for ext, data in s.items():
                info = tarfile.TarInfo(f"{path.stem}_{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path):
    for k in range(5):
        _write_tar(tmp_path / f"s-{k:03d}.tar", [
            {"png": _png((10 * i, 0, 0)), "txt": f"caption {k} {i}".encode(),
             "json": json.dumps({"visual_tokens": [i] * 4}).encode()} for i in range(7)])
    return tmp_path


def _enumerate(stream, world: int, workers: int) -> list[list[str]]:
    """Keys read by each simulated (rank, worker) reader."""
    n = world * workers
    return [[s["key"] for s in stream.iter_reader(r, n)] for r in range(n)]


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 3)])
def test_sharding_is_a_partition(shards, tok, world, workers):
    # 5 shards x 7 samples: file-level split when readers <= 5, sample-level split beyond
    stream = PairStream(shards, None, tok, max_len=12)
    full = [s["key"] for s in stream.iter_reader(0, 1)]
    assert len(full) == 35 and len(set(full)) == 35
    parts = _enumerate(stream, world, workers)
    flat = [k for p in parts for k in p]
    assert sorted(flat) == sorted(full)  # nothing dropped, nothing duplicated
    assert all(parts)  # every reader has work


def test_sharding_through_dataloader_workers(shards, tok):
    stream = TextStream(shards, tok, max_len=8, rank=1, world_size=2)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, collate_fn=collate_batch)
    # readers are numbered rank * num_workers + worker: rank 1 of 2 with 2 workers reads as readers 2 and 3 of 4
    keys = [k for b in loader for k in b["key"]]
    other = [s["key"] for r in (0, 1) for s in TextStream(shards, tok, max_len=8).iter_reader(r, 4)]
    mine = [s["key"] for r in (2, 3) for s in TextStream(shards, tok, max_len=8).iter_reader(r, 4)]
    assert sorted(keys) == sorted(mine) and not set(keys) & set(other)


def test_pair_stream_sample_and_visual_tokens(shards, tok):
    s = next(iter(PairStream(shards, PretrainTransform(8, tokenizer_size=8), tok, max_len=12)))
    assert s["image"].shape == (3, 8, 8) and s["tokenizer_image"].shape == (3, 8, 8)
    assert s["image"].min() >= -1 and s["tokenizer_image"].min() >= 0
    assert s["language_tokens"].tolist()[: len(tok.text_to_ids("caption 0 0")) + 2] == \
        [0] + tok.text_to_ids("caption 0 0") + [2]
    assert s["padding_mask"].dtype == torch.long
    assert s["visual_tokens"].tolist() == [0, 0, 0, 0]
    img = next(iter(ImageStream(shards)))
    assert img["image"].shape == (3, 8, 8) and 0 <= img["image"].min() and img["image"].max() <= 1
    npy = io.BytesIO()
    np.save(npy, np.arange(4))
    _write_tar(shards / "s-999.tar", [{"png": _png(), "visual_tokens.npy": npy.getvalue()}])
    last = list(ImageStream(shards / "s-999.tar"))
    assert last[0]["visual_tokens"].tolist() == [0, 1, 2, 3]


def test_folder_jsonl_and_txt_sources(tmp_path, tok):
    imgs = list(ImageStream(FIX / "images", on_error="skip"))
    assert len(imgs) == 4  # red, green, blue, yellow; corrupt and truncated skipped
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"image_path": str((FIX / "images/red.png").resolve()), "text": "a red square"},
        {"image_path": str((FIX / "images/blue.png").resolve()), "text_segment": [5, 6]},
    ]) + "\n")
    pairs = list(PairStream(tmp_path / "pairs.jsonl", None, tok, max_len=8))
    assert [p["language_tokens"][:4].tolist() for p in pairs][1] == [0, 5, 6, 2]
    (tmp_path / "a.txt").write_text("a red square\n\na blue circle\n")
    texts = list(TextStream(tmp_path / "a.txt", tok, max_len=6))
    assert len(texts) == 2 and texts[0]["key"].endswith("a.txt:1") and texts[1]["key"].endswith("a.txt:3")
    # the official indexes work as pair sources (image_path relative to the jsonl's folder)
    idx = list(PairStream(FIX / "coco_retrieval.train.jsonl", None, tok, max_len=8))
    assert len(idx) == 3
    assert expand_source(str(tmp_path / "{0..0}.txt").replace("{0..0}", "a")) == [tmp_path / "a.txt"]
    assert len(expand_source(str(FIX / "images" / "{0..1}.png").replace("images/{0..1}", "images/*"))) >= 4


def test_brace_and_glob_expansion(shards):
    assert len(expand_source(str(shards / "s-{000..004}.tar"))) == 5
    assert len(expand_source(str(shards / "s-*.tar"))) == 5
    with pytest.raises(FileNotFoundError):
        expand_source(str(shards / "nothing-*.tar"))


def test_broken_inputs_in_streams(tmp_path, tok):
    _write_tar(tmp_path / "a.tar", [{"png": _png(), "txt": b"ok"}, {"png": b"garbage", "txt": b"bad image"},
                                    {"txt": b"no image"}, {"png": _png()}])
    (tmp_path / "b.tar").write_bytes(b"this is not a tar file at all" * 20)
    with pytest.raises(DataError, match=r"a.tar:a_0001: cannot read image"):
        list(PairStream(tmp_path / "a.tar", None, tok))
    with pytest.raises(DataError, match=r"b.tar: cannot open tar shard"):
        list(ImageStream(tmp_path / "b.tar"))
    stream = PairStream([tmp_path / "a.tar", tmp_path / "b.tar"], None, tok, on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(stream)
    assert [g["key"].rsplit(":", 1)[1] for g in got] == ["a_0000"]
    assert stream.errors.count == 4  # bad image, missing image, missing text, unreadable shard
    summary = stream.errors.summary()
    assert "a_0001" in summary and "a_0002" in summary and "no text" in summary and "b.tar" in summary
    assert any("skipped 4" in str(w.message) for w in caught)
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": \n{"caption": "also fine"}\n{"other": 1}\n')
    texts = TextStream(tmp_path / "c.jsonl", tok, on_error="skip")
    assert len(list(texts)) == 2 and texts.errors.count == 2
    with pytest.raises(DataError, match=r"c.jsonl:2: malformed JSON"):
        list(TextStream(tmp_path / "c.jsonl", tok))
