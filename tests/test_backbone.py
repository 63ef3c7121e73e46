"""Backbone structure, routing, masks, padding, caching, presets, compile and checkpointing."""

import ast

import pytest
import torch
from conftest import FIXTURES

import multiway
from multiway.model import MultiwayTransformer, image_to_text_mask
from multiway.model.config import PRESETS, MultiwayConfig

TINY = "beit3_tiny_patch8_32"


def tiny(**kw) -> MultiwayTransformer:
    return multiway.create_model(TINY, **kw).eval()


def inputs(batch=2, text_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, 32, 32, generator=g)
    ids = torch.randint(4, 1000, (batch, text_len), generator=g)
    ids[:, 0] = 0
    return image, ids


def manifest(name: str) -> dict[str, tuple]:
    rows = (line.split("\t") for line in (FIXTURES / "state_dicts" / f"{name}.tsv").read_text().splitlines() if line)
    return {key: tuple(ast.literal_eval(shape)) if shape != "()" else () for key, shape in rows}


@pytest.mark.parametrize(
    "name",
    [
        "beit3_base_patch16_224_captioning",
        "beit3_base_patch16_224_imageclassification",
        "beit3_base_patch16_224_nlvr2",
        "beit3_base_patch16_224_retrieval",
        "beit3_base_patch16_224_vqav2",
        "beit3_large_patch16_224_retrieval",
    ],
)
def test_official_key_manifest(name):
    head = {"vqav2": {"num_classes": 3129}}.get(name.rsplit("_", 1)[1], {})
    with torch.device("meta"):
        model = multiway.create_model(name, **head)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == manifest(name)


@pytest.mark.parametrize(
    "name,count",
    [
        ("beit3_base_patch16_224_imageclassification", 221_754_856),
        ("beit3_base_patch16_224_vqav2", 227_569_977),
        ("beit3_base_patch16_224_nlvr2", 225_719_810),
        ("beit3_base_patch16_224_retrieval", 222_167_041),
        ("beit3_base_patch16_224_captioning", 270_211_082),
        ("beit3_large_patch16_384_retrieval", None),
    ],
)
def test_parameter_counts(name, count):
    with torch.device("meta"):
        model = multiway.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    if count is None:  # large at 384: the 224 count plus the larger vision position table
        count = 674_799_617 + (24 * 24 - 14 * 14) * 1024
    assert n == count


def test_backbone_parameter_counts():
    with torch.device("meta"):
        base = multiway.create_model("beit3_base_patch16_224")
        base_no_ln = multiway.create_model("beit3_base_patch16_224", normalize_output=False)
        large = multiway.create_model("beit3_large_patch16_224")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(base), count(base_no_ln), count(large)) == (220_987_392, 220_984_320, 672_702_464)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta(name):
    with torch.device("meta"):
        model = multiway.create_model(name)
    cfg = PRESETS[name]
    assert len(model.encoder.layers) == cfg.depth
    assert model.encoder.embed_positions["A"].num_embeddings == cfg.num_patches + 3


def test_giant_is_the_papers_variant():
    with torch.device("meta"):
        giant = multiway.create_model("beit3_giant_patch14_224")
    keys = giant.state_dict().keys()
    assert "encoder.layers.0.self_attn.q_proj.weight" in keys  # shared attention, no per-modality copies
    assert not any(".self_attn.q_proj.A." in k for k in keys)
    vl_layers = sorted({int(k.split(".")[2]) for k in keys if ".ffn.C." in k})
    assert vl_layers == [37, 38, 39]
    n = sum(p.numel() for p in giant.parameters())
    assert 1.8e9 < n < 2.0e9  # the paper's "1.9B"


def test_config_round_trip(tmp_path):
    cfg = PRESETS["beit3_giant_patch14_224"].replace(drop_path_rate=0.2)
    for suffix in (".json", ".yaml"):
        cfg.save(tmp_path / f"c{suffix}")
        assert MultiwayConfig.load(tmp_path / f"c{suffix}") == cfg
    assert MultiwayConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(TypeError, match="unknown config field"):
        cfg.replace(width=3)
    with pytest.raises(ValueError, match="divisible"):
        MultiwayConfig(embed_dim=65, num_heads=4)


def test_create_model_errors():
    with pytest.raises(KeyError, match="unknown model"):
        multiway.create_model("beit3_huge_patch16_224")
    with pytest.raises(TypeError):
        multiway.create_model("beit3_tiny_patch8_32_vqav2", num_clases=3)


@torch.no_grad()
def test_routing_uses_only_the_right_expert():
    model = tiny()
    image, ids = inputs()
    v, t = model.encode_image(image), model.encode_text(ids)
    for name, p in model.named_parameters():
        if ".B." in name:
            p.add_(torch.randn_like(p))
    assert torch.equal(model.encode_image(image), v)  # vision-only never touches language experts
    assert not torch.allclose(model.encode_text(ids), t)
    for name, p in model.named_parameters():
        if ".A." in name:
            p.add_(torch.randn_like(p))
    assert not torch.allclose(model.encode_image(image), v)


@torch.no_grad()
def test_paper_variant_vl_expert_serves_fused_inputs_only():
    model = multiway.create_model("beit3_tiny_patch8_32_paper").eval()
    image, ids = inputs()
    v, t, f = model.encode_image(image), model.encode_text(ids), model.encode_fused(image, ids).last_hidden_state
    for name, p in model.named_parameters():
        if ".C." in name:
            p.add_(torch.randn_like(p))
    assert torch.equal(model.encode_image(image), v)
    assert torch.equal(model.encode_text(ids), t)
    assert not torch.allclose(model.encode_fused(image, ids).last_hidden_state, f)
    # Layer 0 has no VL expert: its output on the fused input is routed A|B exactly as in the released variant.
    assert ".ffn.C." not in " ".join(k for k in model.state_dict() if k.startswith("encoder.layers.0."))


@torch.no_grad()
def test_padding_is_invisible_to_real_tokens():
    model = tiny()
    image, ids = inputs(text_len=9)
    short = ids[:, :6]
    padded = ids.clone()
    padded[:, 6:] = 1
    pad = torch.zeros_like(ids)
    pad[:, 6:] = 1
    for run in (lambda t, m: model.encode_text(t, m), lambda t, m: model.encode_fused(image, t, m).last_hidden_state):
        ref = run(short, None)
        out = run(padded, pad)
        assert torch.allclose(out[:, : ref.shape[1]], ref, atol=1e-5)
        junk = padded.clone()
        junk[:, 6:] = 77  # what sits in padded slots must not matter
        assert torch.allclose(run(junk, pad)[:, : ref.shape[1]], ref, atol=1e-5)


def test_image_to_text_mask_semantics():
    m = image_to_text_mask(3, 4)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # image<->image, image->text blocked
    assert m[3:, :3].all()  # text->image
    assert torch.equal(m[3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())  # causal text, diagonal included


@torch.no_grad()
def test_seq2seq_mask_behaviour():
    model = tiny()
    image, ids = inputs(text_len=6)
    nv = model.config.num_vision_tokens
    mask = image_to_text_mask(nv, 6)
    out = model(image, ids, attn_mask=mask).last_hidden_state
    changed = ids.clone()
    changed[:, 4] = 5
    out2 = model(image, changed, attn_mask=mask).last_hidden_state
    assert torch.allclose(out[:, : nv + 4], out2[:, : nv + 4], atol=1e-6)  # image and earlier text unaffected
    assert not torch.allclose(out[:, nv + 4 :], out2[:, nv + 4 :])


@torch.no_grad()
def test_incremental_decoding_equals_full_forward():
    model = tiny()
    image, ids = inputs(text_len=6)
    nv = model.config.num_vision_tokens
    full = model(image, ids, attn_mask=image_to_text_mask(nv, 6)).last_hidden_state[:, nv:]
    cache = model.new_kv_cache()
    steps = [model(image, ids[:, :2], attn_mask=image_to_text_mask(nv, 2), kv_cache=cache).last_hidden_state[:, nv:]]
    for t in range(2, 6):
        step_mask = image_to_text_mask(nv, t + 1)[-1:]
        pos = torch.tensor([[t + 2]])
        steps.append(model(text_ids=ids[:, t : t + 1], attn_mask=step_mask, text_positions=pos, kv_cache=cache).last_hidden_state)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.keys[0][0], cache.keys[0][1])


def test_grad_checkpointing_gives_same_gradients():
    image, ids = inputs()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = multiway.create_model(TINY, grad_checkpointing=ckpt).train()
        model.encode_fused(image, ids).last_hidden_state.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_drop_path_is_active_in_training_only():
    model = multiway.create_model(TINY, drop_path_rate=0.5)
    image, ids = inputs(batch=8)
    model.eval()
    with torch.no_grad():
        a, b = model.encode_image(image), model.encode_image(image)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.encode_image(image), model.encode_image(image))


def test_torch_compile_fullgraph():
    model = tiny()
    image, ids = inputs()
    pad = torch.zeros_like(ids)
    pad[1, -2:] = 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for args in ((image, None, None), (None, ids, pad), (image, ids, pad)):
            assert torch.allclose(compiled(*args).last_hidden_state, model(*args).last_hidden_state, atol=1e-5)


def test_wrong_image_size_and_too_long_text_fail_clearly():
    model = tiny()
    with pytest.raises(ValueError, match="built for 32x32"):
        model.encode_image(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="position table"):
        model.encode_text(torch.zeros(1, 63, dtype=torch.long))


def test_position_tables_start_small_unless_official_init_is_asked_for():
    # The official N(0, 1) position init drowns the token/patch embeddings of a from-scratch model; ours is 0.02.
    torch.manual_seed(0)
    model = MultiwayTransformer(multiway.get_config("beit3_tiny_patch8_32"))
    for table in model.encoder.embed_positions.values():
        assert 0.015 < table.weight.std().item() < 0.025
    image = torch.randn(4, 3, 32, 32)
    cls = model.encode_image(image)[:, 0]
    assert cls.std(0).mean() > 0.3  # the [CLS] output depends on the input
    official = MultiwayTransformer(multiway.get_config("beit3_tiny_patch8_32", position_init_std=None))
    for table in official.encoder.embed_positions.values():
        assert 0.9 < table.weight.std().item() < 1.1
    cfg = MultiwayConfig.from_dict({**multiway.get_config("beit3_tiny_patch8_32").to_dict(), "position_init_std": None})
    assert cfg.position_init_std is None
    with pytest.raises(ValueError, match="depth"):
        MultiwayConfig.from_dict({"depth": None})


def test_backbone_linear_init_std_follows_the_config():
    # Official presets: trunc_normal(0.02, cut at +-0.02). Tiny presets: D^-1/2 (0.02 at width 64 leaves attention
    # uniform and a fused model that learns to ignore the image).
    assert MultiwayConfig().init_std == 0.02 and multiway.get_config("beit3_base_patch16_224").init_std == 0.02
    torch.manual_seed(0)
    tiny = MultiwayTransformer(multiway.get_config("beit3_tiny_patch8_32"))
    assert tiny.config.init_std == 64**-0.5
    official = MultiwayTransformer(multiway.get_config("beit3_tiny_patch8_32", init_std=0.02))
    for model, std in ((tiny, 64**-0.5), (official, 0.02)):
        linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) > 10
        w = torch.cat([x.flatten() for x in linears])
        assert w.abs().max() <= std and 0.45 * std < w.std() < 0.65 * std  # a normal cut at one std: 0.54 std
    with pytest.raises(ValueError, match="init_std"):
        MultiwayConfig(init_std=0.0)


def test_head_init_follows_the_config():
    torch.manual_seed(0)
    fan_in = multiway.create_model("beit3_tiny_patch8_32_vqav2", num_classes=10)
    assert fan_in.config.head_init == "fan_in"
    w = fan_in.head[0].weight  # (128, 64): PyTorch default, uniform(+-64^-1/2)
    assert w.abs().max() <= 64**-0.5 and 0.06 < w.std().item() < 0.085
    assert fan_in.head[0].bias.abs().max() > 0
    official = multiway.create_model("beit3_tiny_patch8_32_vqav2", num_classes=10, head_init="official")
    for module in (official.head[0], official.head[3], official.pooler.dense):
        assert module.weight.abs().max() <= 0.02 and module.weight.std() < 0.02
        assert (module.bias == 0).all()
    # the backbone init is config.init_std's either way
    assert fan_in.beit3.encoder.layers[0].ffn.A.fc1.weight.abs().max() <= fan_in.config.init_std
    # NLVR2: the official x0.001 on both MLP layers only with the official head init
    nlvr2_official = multiway.create_model("beit3_tiny_patch8_32_nlvr2", head_init="official")
    nlvr2_fan_in = multiway.create_model("beit3_tiny_patch8_32_nlvr2")
    for layer in (nlvr2_official.head.dense1, nlvr2_official.head.dense2):
        assert layer.weight.abs().max() <= 0.02 * 0.001 + 1e-12
    assert 0.03 < nlvr2_fan_in.head.dense1.weight.std().item() < 0.04  # uniform(+-256^-1/2): std (3*256)^-1/2
    with pytest.raises(ValueError, match="head_init"):
        MultiwayConfig(head_init="xavier")
    assert MultiwayConfig().head_init == "official"  # the official presets
