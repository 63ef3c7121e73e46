import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from multiway.tokenizers.teachers import PixelTeacher, build_teacher
from multiway.tokenizers.vqkd import VQKD, NormEMAVectorQuantizer, load_vqkd, save_vqkd, vqkd_config
from multiway.tokenizers.vqkd_training import train_visual_tokenizer

REF = Path(os.environ.get("MULTIWAY_REFERENCE", "/work/shared/reference"))
GOLDEN = REF / "golden" / "vqkd" / "vqkd_tiny.safetensors"
TSV = REF / "state_dicts" / "vqkd_encoder_base_decoder_3x768x12_clip.tsv"


def _golden():
    from safetensors import safe_open

    if not GOLDEN.is_file():
        pytest.skip(f"golden file not available: {GOLDEN}")
    with safe_open(str(GOLDEN), "pt") as f:
        return json.loads(f.metadata()["meta"]), {k: f.get_tensor(k) for k in f.keys()}


def test_golden_parity():
    meta, t = _golden()
    cfg = vqkd_config("vqkd_tiny_patch8_32")
    assert (cfg.img_size, cfg.patch_size, cfg.encoder_dim, cfg.encoder_depth) == (32, 8, 64, 2)
    assert (cfg.n_code, cfg.code_dim, cfg.decoder_out_dim, cfg.decoder_depth) == (
        meta["n_code"], meta["code_dim"], meta["decoder_out_dim"], meta["decoder"]["depth"])
    model = VQKD(cfg).eval()
    model.load_official_state_dict({k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")})
    image = t["input.image"]
    assert torch.equal(model.get_codebook_indices(image), t["output.codebook_indices"])
    with torch.no_grad():
        quantized, idx, _ = model.encode(model.pre_process(image))
        decoded = model.decode(quantized)
    assert torch.equal(idx, t["output.codebook_indices"])
    assert (quantized - t["output.quantized"]).abs().max() <= 1e-5
    assert (decoded - t["output.decoded"]).abs().max() <= 1e-5


def test_released_key_layout_matches():
    if not TSV.is_file():
        pytest.skip(f"state-dict listing not available: {TSV}")
    expected = {}
    for line in TSV.read_text().splitlines():
        key, shape = line.split("\t")
        expected[key] = tuple(json.loads(shape.replace("(", "[").replace(",)", "]").replace(")", "]")))
    with torch.device("meta"):
        model = VQKD(vqkd_config("vqkd_encoder_base_decoder_3x768x12_clip"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected


def test_loads_official_pth_dropping_teacher_keys(tmp_path):
    _, t = _golden()
    sd = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    extra = {"teacher_model.visual.proj": torch.zeros(2), "scaling_layer.shift": torch.zeros(3),
             "loss.weight": torch.zeros(1)}
    torch.save({"model": {**sd, **extra}}, tmp_path / "vqkd.pth")
    model = load_vqkd("vqkd_tiny_patch8_32", weights=tmp_path / "vqkd.pth")
    assert torch.equal(model.get_codebook_indices(t["input.image"]), t["output.codebook_indices"])
    bad = dict(sd)
    del bad["decoder.fc_norm.weight"]
    with pytest.raises(KeyError, match="decoder.fc_norm.weight"):
        VQKD(vqkd_config("vqkd_tiny_patch8_32")).load_official_state_dict(bad)
    with pytest.raises(ValueError, match="shape mismatch"):
        VQKD(vqkd_config("vqkd_tiny_patch8_32", n_code=32)).load_official_state_dict(sd)


def test_save_load_roundtrip(tmp_path):
    model = VQKD(vqkd_config("vqkd_tiny_patch8_32")).eval()
    path = save_vqkd(model, tmp_path / "tok.safetensors", extra={"note": "x"})
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away
    again = load_vqkd(path)
    assert again.config == model.config
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again.get_codebook_indices(x), model.get_codebook_indices(x))


def test_quantizer_ema_and_straight_through():
    torch.manual_seed(0)
    q = NormEMAVectorQuantizer(n_code=8, code_dim=4, beta=1.0, decay=0.5).train()
    before = q.embedding.weight.clone()
    # every vector is close to code 0, so only code 0 is used
    z = (before[0].view(1, 4, 1, 1) + 0.01 * torch.randn(2, 4, 3, 3)).requires_grad_(True)
    z_q, loss, idx = q(z)
    assert (idx == 0).all()
    w = q.embedding.weight
    assert torch.allclose(w.norm(dim=-1), torch.ones(8), atol=1e-6)  # rows stay unit
    assert torch.allclose(w[1:], before[1:], atol=1e-6)  # unused codes keep their vector
    assert not torch.equal(w[0], before[0])
    assert q.cluster_size[0] == pytest.approx(0.5 * 18) and q.cluster_size[1:].sum() == 0
    assert loss.item() >= 0 and z_q.shape == z.shape
    z_q.sum().backward()  # straight-through: the gradient of sum(z_q) wrt the normalised z is identity
    assert z.grad is not None and z.grad.abs().sum() > 0
    q.eval()
    frozen = q.embedding.weight.clone()
    q(z.detach())
    assert torch.equal(q.embedding.weight, frozen)  # no update at inference


def test_kmeans_init_on_first_batch():
    torch.manual_seed(0)
    q = NormEMAVectorQuantizer(n_code=4, code_dim=3, kmeans_init=True).eval()
    assert q.embedding.initted.item() == 0 and q.embedding.weight.abs().sum() == 0
    z = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    _, _, idx = q(z.view(64, 3, 1, 1))
    assert q.embedding.initted.item() == 1
    w = q.embedding.weight
    assert torch.allclose(w.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert len(idx.unique()) == 4
    # converged spherical k-means: every code is the normalised mean of the vectors assigned to it
    for k in range(4):
        mean = torch.nn.functional.normalize(z[idx == k].mean(0), dim=0)
        assert torch.dot(mean, w[k]) > 0.99
    q(z.view(64, 3, 1, 1))
    assert torch.equal(q.embedding.weight, w)  # runs once only


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    q = NormEMAVectorQuantizer(n_code=16, code_dim=4, decay=0.9).train()
    g = torch.Generator().manual_seed(100 + rank)
    q(torch.randn(4, 4, 2, 2, generator=g))
    torch.save({"w": q.embedding.weight, "c": q.cluster_size}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ema_all_reduce_equals_single_process_on_the_union(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: no re-import of torch in the children, so this takes a second, not half a minute
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["w"], r1["w"])
    torch.manual_seed(0)
    q = NormEMAVectorQuantizer(n_code=16, code_dim=4, decay=0.9).train()
    z = torch.cat([torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(100 + r)) for r in range(2)])
    q(z)
    assert torch.allclose(q.embedding.weight, r0["w"], atol=1e-6)
    assert torch.allclose(q.cluster_size, r0["c"], atol=1e-6)


def test_pixel_and_callable_teachers():
    x = torch.rand(2, 3, 16, 16)
    t = PixelTeacher(8)(x)
    assert t.shape == (2, 4, 192)
    conv = nn.Conv2d(3, 10, 4, 4)  # (B, 10, 4, 4) feature map -> resampled to the 2x2 tokenizer grid
    out = build_teacher(conv, grid=2, patch_size=8)(x)
    assert out.shape == (2, 4, 10)


def test_torchscript_and_timm_teachers(tmp_path):
    scripted = torch.jit.script(nn.Conv2d(3, 6, 8, 8))
    scripted.save(str(tmp_path / "t.ts"))
    out = build_teacher(f"torchscript:{tmp_path / 't.ts'}", grid=4, patch_size=8)(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 16, 6)
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="weights"):
        build_teacher("timm:vit_tiny_patch16_224", grid=4, patch_size=8)
    teacher = build_teacher("timm:vit_tiny_patch16_224", grid=4, patch_size=8, weights=tmp_path / "vit.pth")
    assert teacher(torch.rand(1, 3, 32, 32)).shape == (1, 16, 192)
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("clip", grid=4, patch_size=8)


def test_train_visual_tokenizer_pixels(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(24):  # flat colour halves: an easy world the codebook must cover
        a, b = (torch.randint(0, 255, (3,), generator=g) for _ in range(2))
        img = torch.zeros(32, 32, 3, dtype=torch.uint8)
        img[:, :16], img[:, 16:] = a, b
        Image.fromarray(img.numpy()).save(tmp_path / f"{i}.png")
    metrics = train_visual_tokenizer(tmp_path, tmp_path / "out" / "tok.safetensors", preset="vqkd_tiny_patch8_32",
                                     steps=30, batch_size=8, lr=2e-3, warmup_steps=5, num_workers=0,
                                     config_overrides={"kmeans_init": True}, progress=False)
    assert metrics["steps"] == 30
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["codes_used"] > 4
    assert metrics["rec_loss"] < 0.5
    model = load_vqkd(metrics["path"])
    assert model.config.decoder_out_dim == 192  # set from the pixel teacher (8*8*3)
    assert model.get_codebook_indices(torch.rand(2, 3, 32, 32)).shape == (2, 16)


def test_unused_codes_restart_when_enabled():
    torch.manual_seed(0)
    q = NormEMAVectorQuantizer(n_code=8, code_dim=4, decay=0.99, restart_unused_after=2).train()
    before = q.embedding.weight.clone()
    z = before[0].view(1, 4, 1, 1) + 0.01 * torch.randn(4, 4, 2, 2)
    q(z)
    assert torch.allclose(q.embedding.weight[1:], before[1:], atol=1e-6)  # idle for one step: kept
    q(z)
    w = q.embedding.weight
    moved = (w[1:] - before[1:]).abs().sum(-1) > 1e-3
    assert moved.all()  # idle for two steps: moved onto the batch's encoder outputs
    assert (w[1:] @ torch.nn.functional.normalize(before[0], dim=0) > 0.99).all()
    assert "quantize.idle_steps" not in VQKD(vqkd_config("vqkd_tiny_patch8_64")).state_dict()  # official key set
