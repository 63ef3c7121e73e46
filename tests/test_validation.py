"""Bad input to the public model entry points meets an error that names the argument, what was expected and
what was given (multiway/model/validation.py), not an IndexError or a reshape error from inside attention."""

import types

import pytest
import torch

import multiway
from multiway.model import validation
from multiway.model.multiway import image_to_text_mask

TINY = "beit3_tiny_patch8_32"  # img 32, patch 8 (16 patches), vocab and 3 channels from the preset


@pytest.fixture(scope="module")
def backbone():
    return multiway.create_model(TINY).eval()


def good(model, batch=2, length=5):
    ids = torch.randint(3, model.config.vocab_size, (batch, length))
    return torch.randn(batch, 3, 32, 32), ids, torch.zeros(batch, length, dtype=torch.long)


BACKBONE_CASES = [
    # (what the call passes instead of the good input, error type, message pattern)
    ("image_long", TypeError, "image must be a float tensor"),
    ("image_3d", ValueError, r"image must be \(B, C, H, W\), got shape \(3, 32, 32\)"),
    ("image_empty", ValueError, "image is an empty batch"),
    ("image_channels", ValueError, "image has 1 channels but the model takes 3"),
    ("image_not_multiple", ValueError, "30x30: height and width must be positive multiples of the patch size 8"),
    ("image_other_size", ValueError, "image is 40x40 but the model was built for 32x32"),
    ("image_list", TypeError, "image must be a"),
    ("ids_float", TypeError, "text_ids must hold integer token ids"),
    ("ids_1d", ValueError, r"text_ids must be \(B, T\), got shape \(5,\)"),
    ("ids_empty", ValueError, r"text_ids is empty: shape \(2, 0\)"),
    ("ids_too_big", ValueError, r"text_ids holds token id \d+ at position \(1, 3\); ids must be in \[0, \d+\)"),
    ("ids_negative", ValueError, r"text_ids holds token id -1 at position \(0, 0\)"),
    ("pad_shape", ValueError, r"text_padding_mask \(padding_mask\) must have the shape of text_ids \(B, T\), \(2, 5\); got \(2, 4\)"),
    ("pad_float", TypeError, r"text_padding_mask \(padding_mask\) must be bool or integer"),
    ("batch_mismatch", ValueError, "batch sizes differ: image 3, text_ids 2"),
    ("masked_shape", ValueError, r"image_masked_positions must have the shape of the image's patch grid \(B, N\), \(2, 16\); got"),
    ("masked_without_image", ValueError, "image_masked_positions was given without an image"),
    ("pad_without_text", ValueError, "without text_ids"),
    ("attn_mask_int", TypeError, "attn_mask must be a bool tensor"),
    ("attn_mask_shape", ValueError, r"attn_mask must be \(L, L_keys\) .* L = 22 .* got shape \(21, 21\)"),
    ("positions_range", ValueError, r"text_positions must be rows in \[0, \d+\)"),
    ("positions_shape", ValueError, r"text_positions must be \(T,\), \(1, T\) or \(B, T\)"),
]


def bad_call(model, case):
    image, ids, pad = good(model)
    kw = {}
    if case == "image_long":
        image = image.long()
    elif case == "image_3d":
        image = image[0]
    elif case == "image_empty":
        image, ids, pad = image[:0], None, None
    elif case == "image_channels":
        image = image[:, :1]
    elif case == "image_not_multiple":
        image = image[..., :30, :30]
    elif case == "image_other_size":
        image = torch.randn(2, 3, 40, 40)
    elif case == "image_list":
        image = image.tolist()
    elif case == "ids_float":
        ids = ids.float()
    elif case == "ids_1d":
        ids, pad, image = ids[0], None, None
    elif case == "ids_empty":
        ids, pad = ids[:, :0], None
    elif case == "ids_too_big":
        ids[1, 3] = model.config.vocab_size
    elif case == "ids_negative":
        ids[0, 0] = -1
    elif case == "pad_shape":
        pad = pad[:, :4]
    elif case == "pad_float":
        pad = pad.float()
    elif case == "batch_mismatch":
        image = torch.randn(3, 3, 32, 32)
    elif case == "masked_shape":
        kw["image_masked_positions"] = torch.zeros(2, 15, dtype=torch.bool)
    elif case == "masked_without_image":
        image, kw["image_masked_positions"] = None, torch.zeros(2, 16, dtype=torch.bool)
    elif case == "pad_without_text":
        ids = None
    elif case == "attn_mask_int":
        kw["attn_mask"] = image_to_text_mask(17, 5).long()
    elif case == "attn_mask_shape":
        kw["attn_mask"] = image_to_text_mask(16, 5)
    elif case == "positions_range":
        image, kw["text_positions"] = None, torch.arange(5) + model.config.max_text_positions
    elif case == "positions_shape":
        image, kw["text_positions"] = None, torch.arange(4)
    return lambda: model(image, ids, pad, **kw)


@pytest.mark.parametrize("case, error, match", BACKBONE_CASES, ids=[c[0] for c in BACKBONE_CASES])
def test_backbone_forward_names_the_bad_argument(backbone, case, error, match):
    with pytest.raises(error, match=match):
        bad_call(backbone, case)()


def test_good_inputs_pass_every_mode(backbone):
    image, ids, pad = good(backbone)
    pad[1, 3:] = 1
    with torch.no_grad():
        assert backbone.encode_image(image).shape == (2, 17, backbone.config.embed_dim)
        assert backbone.encode_text(ids, pad.bool()).shape == (2, 5, backbone.config.embed_dim)
        masked = torch.zeros(2, 16, dtype=torch.long)
        assert backbone.encode_fused(image, ids, pad, image_masked_positions=masked).last_hidden_state.shape[1] == 22
        backbone(image, ids, pad, attn_mask=image_to_text_mask(17, 5))


def test_encode_text_reports_its_padding_mask(backbone):
    _, ids, pad = good(backbone)
    with pytest.raises(ValueError, match=r"\(padding_mask\) must have the shape of text_ids"):
        backbone.encode_text(ids, pad[:1])


def test_checks_are_skipped_while_compiling(backbone, monkeypatch):
    """Under torch.compile the Python checks stand aside (they would break the graph): the deep error returns."""
    _, ids, _ = good(backbone)
    ids[0, 0] = backbone.config.vocab_size
    with pytest.raises(ValueError, match="text_ids holds token id"):
        backbone.encode_text(ids)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(IndexError):
        backbone.encode_text(ids)


def test_id_ranges_are_read_on_cpu_and_on_accelerators_only_when_asked():
    with pytest.raises(ValueError, match=r"token id 99 at position \(0, 1\)"):
        validation.check_token_ids("text_ids", torch.tensor([[0, 99]]), vocab_size=10)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))  # only its device is looked at
    assert validation._values_checkable(torch.zeros(1)) and not validation._values_checkable(on_gpu)
    validation.set_device_value_checks(True)
    try:
        assert validation._values_checkable(on_gpu)
        assert not validation._values_checkable(torch.zeros(1, device="meta"))  # meta tensors hold no values
    finally:
        validation.set_device_value_checks(False)
    validation.check_token_ids("text_ids", torch.tensor([[0, 99]], device="meta"), vocab_size=10)  # shapes only


# --- task heads: the head's own argument names ---------------------------------------------------------


def test_heads_name_their_own_arguments():
    image, ids, pad = good(multiway.create_model(TINY))
    too_big = ids.clone()
    too_big[0, 1] = 10**6
    vqa = multiway.create_model(f"{TINY}_vqav2", num_classes=4)
    with pytest.raises(ValueError, match="question holds token id 1000000"):
        vqa(image, too_big, pad)
    with pytest.raises(ValueError, match=r"padding_mask must have the shape of question \(B, T\)"):
        vqa(image, ids, pad[:, :2])
    with pytest.raises(ValueError, match="batch sizes differ: image 1, question 2"):
        vqa(image[:1], ids, pad)
    nlvr2 = multiway.create_model(f"{TINY}_nlvr2")
    with pytest.raises(ValueError, match="batch sizes differ: image_a 2, image_b 1, text_description 2"):
        nlvr2(image, image[:1], ids, pad)
    with pytest.raises(ValueError, match="image_b has 1 channels"):
        nlvr2(image, image[:, :1], ids, pad)
    with pytest.raises(ValueError, match="text_description holds token id"):
        nlvr2(image, image, too_big, pad)
    retrieval = multiway.create_model(f"{TINY}_retrieval")
    with pytest.raises(ValueError, match="needs both image and text_description"):
        retrieval(image=image)
    with pytest.raises(ValueError, match="pass image, text_description or both"):
        retrieval(only_infer=True)
    with pytest.raises(ValueError, match="batch sizes differ: image 1, text_description 2"):
        retrieval(image[:1], ids, pad)
    assert retrieval(image=image, only_infer=True)[0].shape == (2, retrieval.config.embed_dim)
    classifier = multiway.create_model(f"{TINY}_imageclassification", num_classes=3)
    with pytest.raises(ValueError, match="image is 40x40 but the model was built for 32x32"):
        classifier(torch.randn(1, 3, 40, 40))
    text = multiway.create_model(f"{TINY}_textclassification")
    with pytest.raises(TypeError, match="text_ids must hold integer token ids"):
        text(ids.float())
    captioner = multiway.create_model(f"{TINY}_captioning")
    with pytest.raises(ValueError, match=r"language_masked_pos must have the shape of text_ids \(B, T\)"):
        captioner(image, ids, pad, language_masked_pos=pad[:, :3])
    with pytest.raises(ValueError, match="image=None is a decoding step"):
        captioner(None, ids, pad)
    pretrain = multiway.create_model(f"{TINY}_pretraining")
    with pytest.raises(ValueError, match="text_masked_positions must have the shape of text_ids"):
        pretrain(image, ids, pad, text_masked_positions=pad[:1])


def test_factory_and_loader_refuse_wrong_kinds(tmp_path):
    with pytest.raises(TypeError, match="name_or_path must be a model name or a checkpoint path, got int"):
        multiway.create_model(3)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        multiway.create_model(tmp_path / "nothing.safetensors")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        multiway.load_checkpoint({"w": torch.zeros(1)}, {"w": torch.zeros(1)})
    with pytest.raises(TypeError, match="checkpoint must be a file path or a state dict, got list"):
        multiway.load_checkpoint(multiway.create_model(TINY), [torch.zeros(1)])
