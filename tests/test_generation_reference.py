"""Caption decoding equals the official BEiT-3 evaluation for every beam count.

The fixture holds the captions of unilm's ``CaptioningHandler.eval_batch`` (beam search with
``BeamHypotheses``) run on the official ``BEiT3ForCaptioning`` (torchscale) with the same weights:
3 random models whose ``</s>`` logit is biased so that closing a caption competes with the words,
12 images, beam counts 1-4, max lengths 5/9/16 and length penalties 0/0.6/1/2
(``benchmarks/official_captioning_reference.py`` wrote it).
"""

import json

import pytest
import torch
from conftest import FIXTURES
from safetensors import safe_open
from safetensors.torch import load_file

import multiway
from multiway.model.generation import generate

PATH = FIXTURES / "official_captioning.safetensors"


@pytest.fixture(scope="module")
def reference():
    tensors = load_file(str(PATH))
    with safe_open(str(PATH), "pt") as f:
        meta = f.metadata()
    config, mask_id = json.loads(meta["config"]), int(meta["mask_id"])
    models = []
    for m in range(len(json.loads(meta["models"]))):
        prefix = f"m{m}.state_dict."
        model = multiway.create_model("beit3_base_patch16_224_captioning", **config).eval()
        multiway.load_checkpoint(model, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        models.append(model)
    settings = [tuple(s) for s in json.loads(meta["settings"])]
    return models, tensors, mask_id, settings


def words(sequences: torch.Tensor, mask_id: int) -> list[list[int]]:
    """Caption word ids without <s>, <pad>, </s>, <mask> (what the official batch_decode keeps)."""
    return [[t for t in row.tolist() if t not in (0, 1, 2, mask_id)] for row in sequences]


def official(tensors, m, beams, max_len, lp) -> list[list[int]]:
    return [[t for t in row.tolist() if t >= 0] for row in tensors[f"m{m}.beams{beams}.len{max_len}.lp{lp}"]]


@pytest.mark.parametrize("num_beams", [1, 2, 3, 4])
def test_captions_equal_the_official_handler(reference, num_beams):
    models, tensors, mask_id, settings = reference
    images = tensors["input.images"]
    compared = 0
    for m, model in enumerate(models):
        for beams, max_len, lp in settings:
            if beams != num_beams:
                continue
            out = generate(model, images, mask_id, num_beams=beams, max_len=max_len, length_penalty=lp)
            assert words(out.sequences, mask_id) == official(tensors, m, beams, max_len, lp), (m, beams, max_len, lp)
            compared += 1
    assert compared == 12 * len(models)


def test_the_fixture_exercises_early_and_late_endings(reference):
    _, tensors, _, settings = reference
    lengths = {len(c) for k, v in tensors.items() if ".beams" in k for c in official(tensors, *_parse(k))}
    assert {0, 1} <= lengths and max(lengths) == 13  # empty captions, one word, and captions cut at max_len 16
    distinct = [len({tuple(c) for c in official(tensors, *_parse(k))}) for k in tensors if ".beams" in k]
    assert sum(distinct) / len(distinct) > 6  # the captions depend on the image


def _parse(key: str) -> tuple[int, int, int, float]:
    m, beams, length, lp = key.split(".", 3)
    return int(m[1:]), int(beams[5:]), int(length[3:]), float(lp[2:])


def test_greedy_differs_from_one_beam_where_the_official_handler_does(reference):
    models, tensors, mask_id, settings = reference
    images = tensors["input.images"]
    differ = 0
    for m, model in enumerate(models):
        for beams, max_len, lp in settings:
            if beams == 1:
                greedy = generate(model, images, mask_id, num_beams=1, max_len=max_len, length_penalty=lp, strategy="greedy")
                ref = official(tensors, m, 1, max_len, lp)
                differ += sum(g != r for g, r in zip(words(greedy.sequences, mask_id), ref))
    assert differ > 0  # plain greedy is not the official num_beams=1 decoding on these weights
