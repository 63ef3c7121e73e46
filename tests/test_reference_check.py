"""Independent parity check against the official backbone at another config, seed and padding pattern.

The fixture comes from ``benchmarks/torchscale_reference.py`` run with torchscale 0.3.0 (the official code).
"""

import json

import pytest
import torch
from conftest import FIXTURES
from safetensors import safe_open
from safetensors.torch import load_file

import multiway
from multiway.model import image_to_text_mask

PATH = FIXTURES / "torchscale_check.safetensors"


@pytest.fixture(scope="module")
def reference():
    tensors = load_file(str(PATH))
    with safe_open(str(PATH), "pt") as f:
        config = json.loads(f.metadata()["config"])
    pick = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    model = multiway.create_model("beit3_base_patch16_224", **config).eval()
    multiway.load_checkpoint(model, pick("state_dict."))  # torchscale names = official keys without "beit3."
    return model, pick("input."), pick("output.")


@torch.no_grad()
def test_all_modes_match_official(reference):
    model, i, o = reference
    image, ids, pad = i["image"], i["text_ids"], i["padding_mask"]
    nv = model.config.num_vision_tokens
    ours = {
        "vision_only": model.encode_image(image),
        "vision_masked": model.encode_image(image, masked_positions=i["image_masked"]),
        "text_only": model.encode_text(ids, pad),
        "fused": model.encode_fused(image, ids, pad).last_hidden_state,
        "fused_seq2seq": model(image, ids, pad, attn_mask=image_to_text_mask(nv, ids.shape[1])).last_hidden_state,
    }
    for name, value in ours.items():
        assert (value - o[name]).abs().max().item() <= 1e-5, name
