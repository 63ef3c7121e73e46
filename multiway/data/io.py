"""File I/O and the broken-input policy shared by every reader: :class:`DataError`, :class:`DataErrors`, JSON lines
and images, and the official index file names of a task split.

Broken input policy (``on_error``):

* ``"raise"`` (default): a :class:`DataError` naming the file, the line and what was expected;
* ``"skip"``: the bad line or sample is skipped and counted in a :class:`DataErrors`. Bad index lines are
  dropped when the dataset is built (``dataset.errors``); a bad image found while loading makes
  ``__getitem__`` return ``None``, which ``collate_batch`` drops and lists under ``batch["skipped"]``
  (so it is reported from dataloader workers too); ``errors.absorb(batch)`` counts those.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from multiway.constants import INDEX_FILES


class DataError(RuntimeError):
    """A broken input file, always naming the file (and line) and what was expected."""


class ImageError(DataError):
    """An image that cannot be used: ``name`` (the file), ``reason`` (what is wrong), ``missing`` (no such file)."""

    def __init__(self, name: str, reason: str, missing: bool = False) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason, self.missing = name, reason, missing

    def __reduce__(self):  # picklable, so it crosses from dataloader workers intact
        return type(self), (self.name, self.reason, self.missing)


class DataErrors:
    """Skip-or-raise policy plus a counter of what was skipped.

    ``handle(where, reason)`` raises :class:`DataError` under ``on_error="raise"``; under ``"skip"`` it counts
    the problem and keeps the first ``keep`` locations for :meth:`summary`.
    """

    def __init__(self, on_error: str = "raise", keep: int = 5) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error, self.keep = on_error, keep
        self.count = 0
        self.examples: list[str] = []

    def handle(self, where: str, reason: str | BaseException) -> None:
        msg = f"{where}: {reason}"
        if self.on_error == "raise":
            raise DataError(msg) from (reason if isinstance(reason, BaseException) else None)
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(msg)

    def absorb(self, batch: Mapping[str, Any] | None) -> bool:
        """Count the samples a collated batch reports as skipped; True if the batch still holds samples."""
        if not batch:
            return False
        for msg in batch.get("skipped", ()):
            self.count += 1
            if len(self.examples) < self.keep:
                self.examples.append(msg)
        return int(batch.get("batch_size", 0)) > 0

    def summary(self) -> str:
        if not self.count:
            return "no broken inputs"
        head = "\n  ".join(self.examples)
        more = f"\n  ... and {self.count - len(self.examples)} more" if self.count > len(self.examples) else ""
        return f"skipped {self.count} broken input(s):\n  {head}{more}"

    def __repr__(self) -> str:
        return f"DataErrors(on_error={self.on_error!r}, count={self.count})"


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line number, text, None)`` for each non-blank line of a UTF-8 text file, or ``(line number, None, reason)``
    for a line that is not valid UTF-8, so a reader can count that one line instead of losing the whole file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if line.strip():
                yield lineno, line.rstrip("\r\n"), None


def parse_json_object(line: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` for a line holding a JSON object, else ``(None, reason)``."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg})"
    except RecursionError:
        return None, "malformed JSON (nested too deeply)"
    if not isinstance(item, dict):
        return None, f"expected a JSON object, got {type(item).__name__}"
    return item, None


def read_jsonl(path: str | os.PathLike, errors: DataErrors, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Items of a JSON-lines file; malformed lines (bad UTF-8, bad JSON, not an object) and items missing
    ``required`` keys go to ``errors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    items = []
    for lineno, line, bad in iter_lines(path):
        item, bad = parse_json_object(line) if bad is None else (None, bad)
        if item is None:
            errors.handle(f"{path}:{lineno}", bad)
            continue
        missing = [k for k in required if k not in item]
        if missing:
            errors.handle(f"{path}:{lineno}", f"missing field(s) {missing}; expected {list(required)}")
            continue
        item["_where"] = f"{path.name}:{lineno}"
        items.append(item)
    return items


def write_jsonl(path: str | os.PathLike, items: Iterable[Mapping[str, Any]]) -> int:
    """Write items as JSON lines (atomically); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


# Image decoding is bounded: only these decoders run (no EPS/PDF, which call external programs), and an image whose
# header claims more pixels than ``MAX_IMAGE_PIXELS`` is refused before its pixels are decoded.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; far above any training size, far below what exhausts memory
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


def load_image(source: str | os.PathLike | bytes, where: str | None = None, max_pixels: int | None = None):
    """Open and fully decode one image as an RGB PIL image, or raise :class:`ImageError` naming it.

    Args:
        source: a file path, or the encoded bytes of an image (a tar shard member).
        where: the name used in error messages (default: the path; ``"<bytes>"`` for bytes).
        max_pixels: refuse images whose header claims more pixels (default :data:`MAX_IMAGE_PIXELS`).

    Handled per file, each as an :class:`ImageError` (a :class:`DataError`) saying what is wrong: a missing file
    or a dangling symbolic link, something that is not a regular file (a FIFO would block), a file no allowed decoder
    recognises (:data:`IMAGE_FORMATS`), a decompression bomb, a truncated or corrupt file. Modes are converted
    to RGB faithfully: 16-bit and 32-bit grey (``I;16``, ``I``) are scaled to 8 bits instead of clipped, float
    grey (``F``) in [0, 1] is scaled by 255, CMYK goes through PIL's conversion, and images with transparency
    (palette ``P`` with a transparent index, ``LA``, ``RGBA``, ...) are composited onto :data:`ALPHA_BACKGROUND`.
    """
    from PIL import Image, UnidentifiedImageError

    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = where or "<bytes>", io.BytesIO(bytes(source))
    else:
        path = Path(source)
        name = where or str(path)
        if path.is_symlink() and not path.exists():
            raise ImageError(name, f"dangling symbolic link (points to {os.readlink(path)}, which does not exist)")
        if not path.exists():
            raise ImageError(name, "image not found", missing=True)
        if not path.is_file():
            raise ImageError(name, "not a regular file (expected an image file)")
        fp = path
    try:
        # PIL's own bomb check raises only above twice its limit and warns below; ours is explicit and per call.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=IMAGE_FORMATS) as im:
                width, height = im.size
                if width * height > limit:
                    raise ImageError(name, f"decompression bomb refused: {width}x{height} = {width * height} pixels, "
                                           f"more than the limit of {limit} (multiway.data.io.MAX_IMAGE_PIXELS)")
                if width == 0 or height == 0:
                    raise ImageError(name, f"empty image ({width}x{height})")
                im.load()
                try:
                    return to_rgb(im)
                except ValueError as e:  # a mode PIL cannot convert (LAB, HSV, ...)
                    raise ImageError(name, f"cannot convert image mode {im.mode} to RGB ({e})") from e
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"decompression bomb refused: {e}") from e
    except UnidentifiedImageError:
        raise ImageError(name, f"not an image, or not one of the formats {', '.join(IMAGE_FORMATS)}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as e:  # PIL's corrupt-file errors
        raise ImageError(name, f"truncated or corrupt image ({type(e).__name__}: {e})") from e


def to_rgb(im):
    """A decoded PIL image of any mode as RGB (see :func:`load_image` for the rules)."""
    import numpy as np
    from PIL import Image

    if im.mode == "RGB":
        return im.copy()
    if im.mode.startswith("I") or im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        if im.mode.startswith("I;16") or (im.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 0..65535 -> 0..255
        elif im.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def index_files(task: str, split: str) -> tuple[str, ...]:
    """The official index file names of a task's split (§5)."""
    if task not in INDEX_FILES:
        raise KeyError(f"unknown task {task!r}; known: {sorted(INDEX_FILES)}")
    if split not in INDEX_FILES[task]:
        raise KeyError(f"task {task!r} has no split {split!r}; known: {sorted(INDEX_FILES[task])}")
    return INDEX_FILES[task][split]
