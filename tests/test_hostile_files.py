"""Hostile or broken image files: each is decoded correctly to RGB or refused by name, never a crash or a hang.

The files are built here: a real decompression bomb (a 20000x20000 1-bit PNG of ~60 kB), a truncated PNG, a dangling
symbolic link, a FIFO and an EPS file (whose decoder would run Ghostscript) under image extensions, text named
``.jpg``, and the odd modes a photo folder holds: 1x1, 16-bit grey, CMYK, palette with a transparent index.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import multiway
from multiway.cli import main as cli_main
from multiway.data.io import ImageError, load_image
from multiway.data.streams import ImageStream
from multiway.downstream import predict as P
from multiway.tokenizers.text import train_text_tokenizer


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG of side x side black pixels; zlib squeezes its 50 MB of rows into tens of kB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def _good(path: Path, color=(200, 40, 40), size=32) -> Path:
    Image.new("RGB", (size, size), color).save(path)
    return path


def write_hostile_folder(root: Path) -> tuple[list[str], list[str]]:
    """Writes every kind of file into ``root``; returns (names that must be captioned, names that must be refused)."""
    root.mkdir(parents=True, exist_ok=True)
    good = []
    for i, color in enumerate([(200, 40, 40), (40, 200, 40)]):
        good.append(_good(root / f"good_{i}.png", color).name)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "one_pixel.png")
    grey16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(grey16).save(root / "grey16.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 16, 32))
    palette.save(root / "palette.png", transparency=0)
    good += ["one_pixel.png", "grey16.png", "cmyk.jpg", "palette.png"]

    write_png_bomb(root / "bomb.png")
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, format="PNG")
    (root / "truncated.png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (root / "dangling.jpg").symlink_to(root / "no_such_target.jpg")
    (root / "notes.jpg").write_text("this is a text file with an image extension\n")
    (root / "script.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    os.mkfifo(root / "fifo.png")
    bad = ["bomb.png", "truncated.png", "dangling.jpg", "notes.jpg", "script.jpg", "fifo.png"]
    return good, bad


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("hostile") / "photos"
    good, bad = write_hostile_folder(root)
    return root, good, bad


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("bomb.png", "decompression bomb refused"),
        ("truncated.png", "truncated or corrupt image"),
        ("dangling.jpg", "dangling symbolic link"),
        ("notes.jpg", "not an image"),
        ("script.jpg", "not an image"),  # EPS is not among the allowed decoders: Ghostscript never runs
        ("fifo.png", "not a regular file"),
        ("missing.png", "image not found"),
    ],
)
def test_broken_files_are_refused_by_name(hostile, name, reason):
    root, _, _ = hostile
    with pytest.raises(ImageError, match=reason) as info:
        load_image(root / name)
    assert info.value.name == str(root / name)


def test_pixel_limit_applies_before_decoding(hostile):
    root, _, _ = hostile
    assert load_image(root / "good_0.png", max_pixels=32 * 32).size == (32, 32)
    with pytest.raises(ImageError, match=r"32x32 = 1024 pixels, more than the limit of 1000"):
        load_image(root / "good_0.png", max_pixels=1000)


def test_odd_modes_become_faithful_rgb(hostile):
    root, _, _ = hostile
    one = load_image(root / "one_pixel.png")
    assert one.mode == "RGB" and one.size == (1, 1) and one.getpixel((0, 0)) == (10, 20, 30)
    grey = np.asarray(load_image(root / "grey16.png"))
    # 16-bit values are scaled to 8 bits (not clipped at 255, which turns most of the image white)
    source = np.asarray(Image.open(root / "grey16.png"), dtype=np.float64)
    np.testing.assert_allclose(grey[..., 0], np.rint(source / 257), atol=1)
    assert grey.dtype == np.uint8 and (grey[..., 0] < 255).mean() > 0.9
    cmyk = load_image(root / "cmyk.jpg")
    r, g, b = cmyk.getpixel((16, 16))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # C=0 M=Y=255 is red
    pal = load_image(root / "palette.png")
    assert pal.mode == "RGB"
    assert pal.getpixel((4, 4)) == (255, 255, 255)  # transparent index composited onto white
    assert pal.getpixel((28, 4)) == (255, 0, 0)


def test_bytes_source_named_in_errors():
    with pytest.raises(ImageError, match=r"shard.tar:k1.jpg: not an image"):
        load_image(b"garbage", where="shard.tar:k1.jpg")
    buf = io.BytesIO()
    Image.new("LA", (4, 4), (100, 0)).save(buf, format="PNG")  # grey, fully transparent
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_image_stream_skips_and_counts_hostile_files(hostile):
    root, good, bad = hostile
    stream = ImageStream(root, on_error="skip")  # a folder source: every file with an image extension
    with pytest.warns(UserWarning, match="skipped 6 broken input"):
        samples = list(stream)
    assert sorted(Path(s["key"]).name for s in samples) == sorted(good)
    assert stream.errors.count == len(bad)
    assert all(s["image"].shape[0] == 3 for s in samples)


@pytest.fixture(scope="module")
def caption_model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"a {c} square on a dark background\n" for c in ("red", "green", "blue", "yellow") * 20))
    spm = train_text_tokenizer([corpus], root / "spm", vocab_size=40, hard_vocab_limit=False)
    torch.manual_seed(0)
    model = multiway.create_model("beit3_tiny_patch8_32_captioning")
    path = root / "captioner.safetensors"
    multiway.save_pretrained(model, path)
    return path, Path(spm)


def test_predict_caption_folder_captions_good_names_bad_strict_fails(hostile, caption_model, capsys):
    root, good, bad = hostile
    model, spm = caption_model
    argv = ["predict", "caption", str(root), "--model", str(model), "--tokenizer", str(spm), "--json",
            "--num-beams", "1", "--max-len", "4"]
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    captioned = sorted(Path(line.split('"path": "')[1].split('"')[0]).name for line in out.splitlines() if line)
    assert captioned == sorted(good)
    for name in bad:
        assert name in err, f"{name} not reported on stderr:\n{err}"
    assert cli_main([*argv, "--strict"]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == len(good) and all(name in err for name in bad)


def test_predict_read_images_skips_bad_keeps_order(hostile):
    root, good, bad = hostile
    paths = P.list_images([root])
    assert sorted(p.name for p in paths) == sorted(good + bad)  # the dangling link and the FIFO are listed, then refused
    tensors, ok, errors = P.read_images(paths, lambda im: torch.zeros(3, 2, 2))
    assert sorted(p.name for p in ok) == sorted(good) and len(tensors) == len(good)
    assert len(errors) == len(bad)
