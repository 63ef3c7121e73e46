"""Property-based tests (hypothesis) for the parts whose inputs are unbounded: the text tokenizer, both masking
generators, the jsonl readers and tar shards under random corruption, the VQA answer normaliser and the collate function.

Each property states what must hold for every input; hypothesis searches for a counterexample (few examples per
test, so the suite stays fast; a failure prints the minimal input).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from multiway.data.index_dataset import collate_batch
from multiway.data.io import DataErrors, read_jsonl
from multiway.data.masking import IGNORE_INDEX, BlockMaskingGenerator, mask_captioning, mask_text
from multiway.data.streams import PairStream, TextStream
from multiway.downstream.metrics import normalize_vqa_answer
from multiway.tokenizers.text import TextTokenizer, train_text_tokenizer

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    words = "a red blue green circle square triangle is left of right above below the small large two three".split()
    rng = random.Random(0)
    corpus.write_text("".join(" ".join(rng.choices(words, k=8)) + "\n" for _ in range(300)))
    return TextTokenizer(train_text_tokenizer([corpus], root / "tok", vocab_size=60, hard_vocab_limit=False))


# --- text tokenizer -------------------------------------------------------------------------------------


@FAST
@given(text=st.text(max_size=200) | st.text(st.characters(categories=["Cs", "L", "Zs"]), max_size=50)  # lone surrogates too
       | st.text(alphabet="abc de\n\t", min_size=2000, max_size=5000), max_len=st.integers(2, 80))
def test_tokenizer_any_unicode(tokenizer, text, max_len):
    ids = tokenizer.text_to_ids(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert not set(ids) & {BOS, PAD, EOS, tokenizer.mask_id}  # specials come only from encode
    row, pad = tokenizer.encode(text, max_len)
    n = min(len(ids), max_len - 2) + 2
    assert len(row) == len(pad) == max_len
    assert row[0] == BOS and row[n - 1] == EOS and row[1 : n - 1] == ids[: n - 2]
    assert pad == [0] * n + [1] * (max_len - n) and row[n:] == [PAD] * (max_len - n)
    assert isinstance(tokenizer.decode(row), str)
    batch = tokenizer([text, ""], max_len=max_len)
    assert batch["language_tokens"].shape == (2, max_len) and batch["language_tokens"][1, :2].tolist() == [BOS, EOS]


@FAST
@given(text=st.text(alphabet="abcdefghilnorstuvw ", max_size=60))
def test_tokenizer_round_trip_on_covered_text(tokenizer, text):
    # SentencePiece normalises whitespace: runs collapse and the ends are trimmed
    assert tokenizer.decode(tokenizer.text_to_ids(text)) == " ".join(text.split())


# --- masking --------------------------------------------------------------------------------------------


@FAST
@given(h=st.integers(1, 16), w=st.integers(1, 16), data=st.data(), min_block=st.integers(1, 20), seed=st.integers(0, 2**31),
       exact=st.booleans())
def test_block_masking_counts(h, w, data, min_block, seed, exact):
    target = data.draw(st.integers(0, h * w))
    gen = BlockMaskingGenerator((h, w), target, min_num_patches=min_block, exact=exact)
    mask = gen(random.Random(seed))
    assert mask.shape == (h, w) and mask.dtype == torch.bool
    if exact:
        assert int(mask.sum()) == target
    else:
        assert int(mask.sum()) <= target
    assert torch.equal(mask.flatten(), gen(random.Random(seed), flat=True))  # the same draw for the same seed


@FAST
@given(side=st.integers(1, 20), ratio=st.floats(0, 1))
def test_block_masking_from_ratio(side, ratio):
    gen = BlockMaskingGenerator.from_ratio(side, ratio)
    assert int(gen(random.Random(0)).sum()) == round(ratio * side * side)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_block_masking_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        BlockMaskingGenerator.from_ratio(14, ratio)


@FAST
@given(rows=st.integers(1, 4), length=st.integers(1, 24), data=st.data(), ratio=st.floats(0, 1), seed=st.integers(0, 2**31),
       probs=st.sampled_from([(1.0, 0.0, 0.0), (0.8, 0.1, 0.1), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]))
def test_mask_text_respects_specials_and_padding(rows, length, data, ratio, seed, probs):
    vocab, mask_id = 50, 49
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, vocab - 2), min_size=length, max_size=length),
                                          min_size=rows, max_size=rows)))
    lengths = data.draw(st.lists(st.integers(0, length), min_size=rows, max_size=rows))
    padding = torch.tensor([[0] * n + [1] * (length - n) for n in lengths])
    out, chosen, labels = mask_text(ids, padding, ratio, (BOS, PAD, EOS, mask_id), mask_id, vocab_size=mask_id,
                                    rng=np.random.default_rng(seed), replace_probs=probs)
    maskable = (padding == 0) & ~torch.isin(ids, torch.tensor([BOS, PAD, EOS, mask_id]))
    assert not (chosen & ~maskable).any()
    for b in range(rows):
        n = int(maskable[b].sum())
        assert int(chosen[b].sum()) == (min(n, max(1, round(ratio * n))) if n else 0)
    assert torch.equal(out[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen]) and (labels[~chosen] == IGNORE_INDEX).all()
    if probs == (1.0, 0.0, 0.0):
        assert (out[chosen] == mask_id).all()
    assert ((out >= 0) & (out < vocab)).all() and not (out[chosen] == BOS).any()


@pytest.mark.parametrize(("kwargs", "match"), [({"ratio": 1.5}, "ratio"), ({"vocab_size": 3}, "vocab_size")])
def test_mask_text_rejects_bad_arguments(kwargs, match):
    args = {"ratio": 0.15, "vocab_size": 20} | kwargs
    with pytest.raises(ValueError, match=match):
        mask_text(torch.tensor([0, 5, 6, 2]), torch.zeros(4, dtype=torch.long), args["ratio"], (0, 1, 2), 19,
                  vocab_size=args["vocab_size"], rng=np.random.default_rng(0))


@FAST
@given(length=st.integers(2, 40), data=st.data(), prob=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_mask_captioning_positions(length, data, prob, seed):
    num = data.draw(st.integers(2, length))
    vocab, mask_id = 30, 29
    tokens = [BOS] + [5] * (num - 2) + [EOS] + [PAD] * (length - num)
    masked, pos = mask_captioning(tokens, num, prob, mask_id, vocab, random.Random(seed))
    assert len(masked) == len(pos) == length
    chosen = [i for i, p in enumerate(pos) if p]
    assert len(chosen) == max(1, min(int(num * prob + 0.5), num - 1))
    assert all(1 <= i < num for i in chosen)  # never <s>, never padding
    assert all(masked[i] == tokens[i] for i in range(length) if not pos[i])
    assert all(3 <= t < vocab for i, t in enumerate(masked) if pos[i] and t != tokens[i])


@pytest.mark.parametrize(("num", "vocab", "match"), [(1, 30, "at least 2"), (9, 30, "num_tokens"), (4, 3, "vocab_size")])
def test_mask_captioning_rejects_bad_arguments(num, vocab, match):
    with pytest.raises(ValueError, match=match):
        mask_captioning([0, 5, 2, 1], num, 0.6, 29, vocab, random.Random(0))


# --- jsonl readers under random corruption --------------------------------------------------------------

_items = st.lists(st.fixed_dictionaries({"image_path": st.text(max_size=8), "text": st.text(max_size=20),
                                         "label": st.integers(-5, 5)}), min_size=1, max_size=12)
# A corruption never writes a newline, so the file keeps its line count and each line is judged on its own.
_byte = st.integers(0, 255).filter(lambda b: b != 0x0A)


@st.composite
def corrupted_lines(draw) -> list[bytes]:
    lines = [json.dumps(item).encode() for item in draw(_items)]
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(lines) - 1))
        line = bytearray(lines[i])
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "drop_key"]))
        at = draw(st.integers(0, max(0, len(line) - 1)))
        if op == "replace" and line:
            line[at] = draw(_byte)
        elif op == "insert":
            line[at:at] = bytes(draw(st.lists(_byte, min_size=1, max_size=4)))
        elif op == "delete":
            del line[at : at + draw(st.integers(1, 5))]
        elif op == "truncate":
            del line[at:]
        else:
            line = bytearray(json.dumps({"text": "no label"}).encode())
        lines[i] = bytes(line)
    return lines


def _nonblank(lines: list[bytes]) -> int:
    def blank(raw: bytes) -> bool:
        try:
            return not raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return False

    return sum(not blank(raw) for raw in lines)


@FAST
@given(lines=corrupted_lines())
def test_read_jsonl_counts_every_corrupt_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "index.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    errors = DataErrors("skip")
    items = read_jsonl(path, errors, required=("image_path", "label"))
    assert len(items) + errors.count == _nonblank(lines)
    assert all("image_path" in it and "label" in it for it in items)
    if errors.count:
        assert "index.jsonl:" in errors.summary()


@FAST
@given(lines=corrupted_lines())
def test_text_stream_counts_every_corrupt_line(tokenizer, tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("stream") / "texts.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stream = TextStream(path, tokenizer, max_len=16, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        samples = list(stream)
    assert len(samples) + stream.errors.count == _nonblank(lines)
    assert all(s["language_tokens"].shape == (16,) for s in samples)


# --- VQA answer normaliser ------------------------------------------------------------------------------

ANSWER_TEXT = st.text(max_size=40) | st.lists(
    st.sampled_from(["a", "an", "the", "two", "Two", "dont", "can't", "1,000", "2.5", "yes!", "red.", "no", "?", ",", " ",
                     "ten", "none", "\n", "\t", "it's", "3.", "x-ray", "(left)", "#1", "...", "'"]),
    max_size=10).map(" ".join)


@FAST
@given(answer=ANSWER_TEXT)
def test_normalize_vqa_answer_shape(answer):
    out = normalize_vqa_answer(answer)
    assert isinstance(out, str) and out == out.strip() and "  " not in out and "\n" not in out and "\t" not in out
    words = out.split()
    assert not set(words) & {"a", "an", "the"}
    assert not set(words) & {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}
    assert out == out.lower()


@FAST
@given(answer=ANSWER_TEXT)
def test_normalize_vqa_answer_is_idempotent(answer):
    once = normalize_vqa_answer(answer)
    assert normalize_vqa_answer(once) == once


# --- collate --------------------------------------------------------------------------------------------

_value = st.one_of(
    st.integers(-3, 3).map(lambda n: ("int", n)),
    st.floats(-2, 2, allow_nan=False).map(lambda x: ("float", x)),
    st.lists(st.one_of(st.integers(0, 3), st.floats(0, 1, allow_nan=False)), min_size=3, max_size=3).map(lambda v: ("list", v)),
    st.text(max_size=5).map(lambda s: ("str", s)),
)


@FAST
@given(kinds=st.lists(_value, min_size=1, max_size=4), rows=st.lists(st.sampled_from(["ok", "none", "skip"]), min_size=1, max_size=6),
       seed=st.integers(0, 1000))
def test_collate_batch_keeps_values_and_counts_skips(kinds, rows, seed):
    rng = random.Random(seed)
    samples = []
    for r in rows:
        if r == "none":
            samples.append(None)
        elif r == "skip":
            samples.append({"_skipped": f"x.jsonl:{len(samples)}: broken"})
        else:
            sample = {"image": torch.full((3, 2, 2), float(rng.random()))}
            for k, (kind, v) in enumerate(kinds):
                if kind == "list":  # each row draws its own values of the kind the first row has
                    v = [rng.choice([rng.randint(0, 3), rng.random()]) if isinstance(x, float) else rng.randint(0, 3) for x in v]
                sample[f"f{k}"] = v
            samples.append(sample)
    kept = [s for s in samples if s is not None and "_skipped" not in s]
    batch = collate_batch(samples)
    assert batch["batch_size"] == len(kept)
    assert batch.get("skipped", []) == [s["_skipped"] for s in samples if s is not None and "_skipped" in s]
    if not kept:
        return
    assert torch.equal(batch["image"], torch.stack([s["image"] for s in kept]))
    for k in range(len(kinds)):
        values, got = [s[f"f{k}"] for s in kept], batch[f"f{k}"]
        if isinstance(got, torch.Tensor):
            assert got.shape[0] == len(kept)
            flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
            assert got.flatten().tolist() == pytest.approx(flat), f"f{k}: {values} collated as {got.tolist()}"
            assert got.dtype == (torch.long if all(type(x) is int for x in flat) else torch.float32)
        else:
            assert got == values


# --- tar shards under random damage ---------------------------------------------------------------------


def _shard(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            png = io.BytesIO()
            Image.new("RGB", (8, 8), (30 * i % 256, 0, 0)).save(png, format="PNG")
            for ext, data in (("png", png.getvalue()), ("txt", f"a red square {i}".encode())):
                info = tarfile.TarInfo(f"s_{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@FAST
@given(n=st.integers(1, 5), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3))
def test_damaged_tar_shard_never_crashes_a_stream(tokenizer, tmp_path_factory, n, cut, flips):
    data = bytearray(_shard(n))
    for where, xor in flips:
        data[int(where * (len(data) - 1))] ^= xor
    path = tmp_path_factory.mktemp("tar") / "shard.tar"
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))]))
    stream = PairStream(path, transform=None, tokenizer=tokenizer, max_len=12, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        samples = list(stream)
    assert len(samples) <= n
    for s in samples:  # what comes through is a whole sample
        assert s["image"].shape == (3, 8, 8) and s["language_tokens"].shape == (12,)
    if not flips and cut == 1:
        assert len(samples) == n and stream.errors.count == 0
