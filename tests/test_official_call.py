"""The official backbone call: ``model.beit3(textual_tokens=..., visual_tokens=..., ...)`` returns the official dict.

Checked against the golden outputs and against ``fixtures/torchscale_official_call.safetensors``, written by
``benchmarks/torchscale_official_call.py`` from torchscale's ``BEiT3.forward`` at its own config and seed.
"""

import json

import pytest
import torch
from conftest import FIXTURES, GOLDEN_CONFIG, load_golden
from safetensors import safe_open
from safetensors.torch import load_file

import multiway
from multiway.model import image_to_text_mask

TOL = 1e-5
PATH = FIXTURES / "torchscale_official_call.safetensors"


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a.float() - b.float()).abs().max().item() <= TOL


@torch.no_grad()
def test_golden_backbone_through_the_official_call():
    sd, i, o = load_golden("backbone")
    model = multiway.create_model("beit3_base_patch16_224", **GOLDEN_CONFIG).eval()
    multiway.load_checkpoint(model, sd)
    close(model(visual_tokens=i["image"])["encoder_out"], o["vision_only"])
    close(model(textual_tokens=i["text_ids"], text_padding_position=i["padding_mask"])["encoder_out"], o["text_only"])
    fused = model(textual_tokens=i["text_ids"], visual_tokens=i["image"], text_padding_position=i["padding_mask"])
    close(fused["encoder_out"], o["fused"])
    assert fused["multiway_split_position"] == model.config.num_vision_tokens


@torch.no_grad()
def test_golden_captioning_decoding_through_the_official_call():
    sd, i, o = load_golden("captioning")
    model = multiway.create_model("beit3_base_patch16_224_captioning", **GOLDEN_CONFIG).eval()
    multiway.load_checkpoint(model, sd)
    nv = model.config.num_vision_tokens
    blocked = (~image_to_text_mask(nv, 2)).long()  # official convention: nonzero = blocked
    state: dict = {}
    step1 = model.beit3(textual_tokens=i["decode_step1_ids"], visual_tokens=i["image"], attn_mask=blocked, incremental_state=state)
    close(model.mlm_head(step1["encoder_out"][:, nv:]), o["decode_step1_logits"])
    for layer in state.values():
        layer["prev_key"], layer["prev_value"] = layer["prev_key"][:, :, :-1], layer["prev_value"][:, :, :-1]
    rows = (~image_to_text_mask(nv, 3)[-2:]).long()
    step2 = model.beit3(textual_tokens=i["decode_step2_ids"], attn_mask=rows, incremental_state=state, positions=torch.arange(3, 5))
    close(model.mlm_head(step2["encoder_out"]), o["decode_step2_logits"])
    assert step2["multiway_split_position"] == 0


@pytest.fixture(scope="module")
def reference():
    tensors = load_file(str(PATH))
    with safe_open(str(PATH), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    pick = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    model = multiway.create_model("beit3_base_patch16_224", **config).eval()
    report = multiway.load_checkpoint(model, pick("state_dict."))
    assert not report.missing and not report.unexpected
    return model, pick("input."), pick("output."), meta


@torch.no_grad()
@pytest.mark.parametrize("name", ["vision", "vision_masked", "text", "text_unpadded", "fused", "fused_unpadded", "fused_seq2seq"])
def test_every_entry_of_the_official_dict(reference, name):
    backbone, i, o, meta = reference
    calls = {
        "vision": dict(visual_tokens=i["image"]),
        "vision_masked": dict(visual_tokens=i["image"], vision_masked_position=i["image_masked"]),
        "text": dict(textual_tokens=i["text_ids"], text_padding_position=i["padding_mask"]),
        "text_unpadded": dict(textual_tokens=i["text_ids"]),
        "fused": dict(textual_tokens=i["text_ids"], visual_tokens=i["image"], text_padding_position=i["padding_mask"]),
        "fused_unpadded": dict(textual_tokens=i["text_ids"], visual_tokens=i["image"]),
        "fused_seq2seq": dict(textual_tokens=i["text_ids"], visual_tokens=i["image"], text_padding_position=i["padding_mask"],
                              attn_mask=i["seq2seq_mask"]),
    }
    result = backbone(**calls[name])
    assert set(result) == {"encoder_out", "encoder_embedding", "encoder_padding_mask", "encoder_states", "l_aux", "multiway_split_position"}
    close(result["encoder_out"], o[f"{name}.encoder_out"])
    close(result["encoder_embedding"], o[f"{name}.encoder_embedding"])
    assert torch.equal(result["encoder_padding_mask"].long(), o[f"{name}.encoder_padding_mask"])
    assert result["multiway_split_position"] == json.loads(meta["splits"])[name]
    assert result["encoder_states"] == [] and result["l_aux"] == [None] * backbone.num_layers


@torch.no_grad()
def test_incremental_decoding_with_positions(reference):
    backbone, i, o, meta = reference
    image, mask_id, words = i["image"], int(meta["mask_id"]), json.loads(meta["words"])
    nv, batch = backbone.config.num_vision_tokens, image.shape[0]
    state: dict = {}  # layer entries are created by the call, as the official captioning head does
    step = backbone(textual_tokens=torch.tensor([[0, mask_id]] * batch), visual_tokens=image,
                    attn_mask=(~image_to_text_mask(nv, 2)).long(), incremental_state=state)
    close(step["encoder_out"], o["decode_step1"])
    for n, word in enumerate(words, start=2):
        for layer in state.values():
            layer["prev_key"], layer["prev_value"] = layer["prev_key"][:, :, :-1], layer["prev_value"][:, :, :-1]
        rows = torch.ones(2, nv + n + 1, dtype=torch.long)
        rows[:, :nv] = 0
        rows[0, nv:nv + n] = 0
        rows[1, nv:nv + n + 1] = 0
        step = backbone(textual_tokens=torch.tensor([[word, mask_id]] * batch), attn_mask=rows, incremental_state=state,
                        positions=torch.arange(n + 1, n + 3).unsqueeze(0))
        close(step["encoder_out"], o[f"decode_step{n}"])
    for layer in state.values():
        layer["prev_key"] = layer["prev_key"][:, :, :-1]
    close(state[0]["prev_key"], o["final_cache_key_layer0"])


def test_official_call_errors_name_the_problem(reference):
    backbone, i, _, _ = reference
    with pytest.raises(TypeError, match="unknown argument.*visual_token"):
        backbone(visual_token=i["image"])
    with pytest.raises(TypeError, match="mix of argument styles"):
        backbone(i["image"], textual_tokens=i["text_ids"])
    with pytest.raises(ValueError, match="positions is supported for text-only"):
        backbone(visual_tokens=i["image"], positions=torch.arange(2, 10))
    with pytest.raises(ValueError, match="textual_tokens, visual_tokens or both"):
        backbone(incremental_state={})
