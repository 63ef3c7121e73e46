"""Parity with the official BEiT-3 modules (golden outputs at a tiny config), fp32, max |Δ| <= 1e-5."""

import pytest
import torch
from conftest import GOLDEN_CONFIG, golden_meta, load_golden

import multiway

TOL = 1e-5


def build(task: str, **head):
    sd, inputs, outputs = load_golden(task if task else "backbone")
    name = "beit3_base_patch16_224" + (f"_{task}" if task else "")
    model = multiway.create_model(name, **GOLDEN_CONFIG, **head)
    report = multiway.load_checkpoint(model, sd)
    assert not report.missing and not report.unexpected
    return model.eval(), inputs, outputs


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= TOL


def test_golden_config_matches_fixture():
    meta = golden_meta("backbone")
    assert all(meta[k] == v for k, v in GOLDEN_CONFIG.items())


@torch.no_grad()
def test_backbone_three_modes():
    model, i, o = build("")
    close(model.encode_image(i["image"]), o["vision_only"])
    close(model.encode_text(i["text_ids"], i["padding_mask"]), o["text_only"])
    close(model.encode_fused(i["image"], i["text_ids"], i["padding_mask"]).last_hidden_state, o["fused"])


@torch.no_grad()
def test_image_classification():
    model, i, o = build("imageclassification", num_classes=golden_meta("imageclassification")["num_classes"])
    assert model.beit3.encoder.layer_norm is None  # official: no final LN for classification
    close(model(image=i["image"]), o["logits"])


@torch.no_grad()
def test_vqav2():
    model, i, o = build("vqav2", num_classes=golden_meta("vqav2")["vqa_num_classes"])
    close(model(image=i["image"], question=i["text_ids"], padding_mask=i["padding_mask"]), o["logits"])


@torch.no_grad()
def test_nlvr2():
    model, i, o = build("nlvr2")
    logits = model(image_a=i["image"], image_b=i["image2"], text_description=i["text_ids"], padding_mask=i["padding_mask"])
    close(logits, o["logits"])


@torch.no_grad()
def test_retrieval_inference_and_loss():
    model, i, o = build("retrieval")
    v, t = model(image=i["image"], text_description=i["text_ids"], padding_mask=i["padding_mask"], only_infer=True)
    close(v, o["vision_cls"])
    close(t, o["language_cls"])
    loss, v2, t2 = model(image=i["image"], text_description=i["text_ids"], padding_mask=i["padding_mask"])
    close(loss.reshape(1), o["loss"])
    close(v2, v)


@torch.no_grad()
def test_captioning_masked_lm_and_two_decoding_steps():
    model, i, o = build("captioning")
    logits, _ = model(
        image=i["image"], text_ids=i["text_ids"], padding_mask=i["padding_mask"], language_masked_pos=i["language_masked_pos"]
    )
    close(logits, o["masked_logits"])
    # Official protocol (golden/README.md): step 1 image + [<s>, <mask>], drop the <mask> K/V, step 2 text only.
    state = {}
    step1, state = model(
        image=i["image"],
        text_ids=i["decode_step1_ids"],
        padding_mask=torch.zeros_like(i["decode_step1_ids"]),
        language_masked_pos=None,
        text_len=2,
        incremental_state=state,
    )
    close(step1, o["decode_step1_logits"])
    for layer in state.values():
        layer["prev_key"], layer["prev_value"] = layer["prev_key"][:, :, :-1], layer["prev_value"][:, :, :-1]
    step2, _ = model(
        image=None, text_ids=i["decode_step2_ids"], padding_mask=None, language_masked_pos=None, text_len=3, incremental_state=state
    )
    close(step2, o["decode_step2_logits"])


@torch.no_grad()
def test_captioning_kvcache_object_matches_dict_protocol():
    model, i, o = build("captioning")
    cache = model.beit3.new_kv_cache()
    step1, _ = model(image=i["image"], text_ids=i["decode_step1_ids"], text_len=2, incremental_state=cache)
    cache.crop(1)
    step2, _ = model(image=None, text_ids=i["decode_step2_ids"], text_len=3, incremental_state=cache)
    close(step1, o["decode_step1_logits"])
    close(step2, o["decode_step2_logits"])


@pytest.mark.parametrize("task", ["imageclassification", "vqav2", "nlvr2", "retrieval", "captioning"])
def test_state_dict_keys_and_shapes_match_golden_files(task):
    sd, _, _ = load_golden(task)
    head = {"imageclassification": {"num_classes": 10}, "vqav2": {"num_classes": 20}}.get(task, {})
    model = multiway.create_model(f"beit3_base_patch16_224_{task}", **GOLDEN_CONFIG, **head)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in sd.items()}
