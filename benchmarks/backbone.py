"""Backbone speed and memory: multiway vs the official implementation (torchscale), same weights, same inputs.

    python benchmarks/backbone.py --preset beit3_base_patch16_224 --batch 8 --text-len 64 \
        --torchscale-python /tmp/torchscale-venv/bin/python --out results/backbone_cpu.json

For each mode (vision-only, text-only, fused) it measures forward (no grad) and forward+backward throughput
in samples/s and the peak memory of a training step, each measurement in a fresh worker process so peaks do
not mix. Peak memory is the growth over the step of ``torch.cuda.max_memory_allocated`` on GPU and of the
process's peak RSS on CPU (its mark reset just before the step): activations, gradients and workspace, the
weights both implementations hold excluded. On CUDA the step runs under bf16 autocast.
Both implementations load the same weights (a random init saved once) and their outputs are compared.
torchscale pins timm 0.6.13, so it lives in its own virtual environment: pass its interpreter with
``--torchscale-python`` (or run this script from that environment with multiway on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("vision", "text", "fused")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so a later peak belongs to the step alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(cfg: dict, batch: int, text_len: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], generator=g).to(device)
    ids = torch.randint(4, cfg["vocab_size"], (batch, text_len), generator=g)
    ids[:, 0] = 0
    pad = torch.zeros(batch, text_len, dtype=torch.long)
    pad[batch // 2 :, -text_len // 4 :] = 1  # half the batch padded, as in real batches
    return image, ids.to(device), pad.to(device)


def _build(impl: str, cfg: dict, weights: str, device: str):
    from safetensors.torch import load_file

    state = load_file(weights)
    if impl in ("multiway", "multiway_plain"):
        import multiway

        # multiway_plain: the same model without the selective recomputation of norms and GELU in backward
        model = multiway.create_model("beit3_base_patch16_224", recompute_norms=impl == "multiway", **cfg)
        multiway.load_checkpoint(model, state)

        def run(image, ids, pad):
            return model(image, ids, pad).last_hidden_state

    else:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3

        args = EncoderConfig(
            vocab_size=cfg["vocab_size"], multiway=True, layernorm_embedding=False, normalize_output=True,
            no_output_layer=True, encoder_embed_dim=cfg["embed_dim"], encoder_attention_heads=cfg["num_heads"],
            encoder_ffn_embed_dim=cfg["ffn_dim"], encoder_layers=cfg["depth"], img_size=cfg["img_size"],
            patch_size=cfg["patch_size"], in_chans=3, max_source_positions=cfg["max_text_positions"],
        )
        model = BEiT3(args)
        model.load_state_dict(state)

        def run(image, ids, pad):
            return model(textual_tokens=ids, visual_tokens=image, text_padding_position=pad)["encoder_out"]

    return model.to(device), run


def worker(impl: str, mode: str, cfg: dict, weights: str, batch: int, text_len: int, iters: int, device: str, out_file: str | None) -> dict:
    """One measurement in this process: forward and forward+backward throughput, training-step peak memory."""
    torch.manual_seed(0)
    model, run = _build(impl, cfg, weights, device)
    image, ids, pad = _inputs(cfg, batch, text_len, device)
    args = {"vision": (image, None, None), "text": (None, ids, pad), "fused": (image, ids, pad)}[mode]
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn) -> float:
        fn()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - start) / iters

    model.eval()
    with torch.no_grad(), autocast:
        output = run(*args).float().cpu()
        fwd = timed(lambda: run(*args))
    if out_file:
        torch.save(output, out_file)

    model.train()

    def step():
        with autocast:
            loss = run(*args).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    # Measure the step's memory before timing, from a state where grads have not been allocated yet.
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); CPU memory needs Linux >= 4.0")
        base = _rss_mb("VmRSS")
        step()
        peak_mb = _rss_mb("VmHWM") - base
    train = timed(step)
    return {"impl": impl, "mode": mode, "fwd_samples_per_s": batch / fwd, "train_samples_per_s": batch / train, "train_peak_mb": peak_mb}


def _spawn(python: str, impl: str, mode: str, common: list[str], out_file: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [python, __file__, "--worker", impl, "--mode", mode, "--output-file", out_file, *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{impl}/{mode} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="beit3_base_patch16_224")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="MultiwayConfig overrides (values parsed as YAML), e.g. depth=2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--torchscale-python", default=None, help="interpreter of an environment with torchscale")
    p.add_argument("--repeats", type=int, default=1, help="alternate the implementations this many times, keep the best")
    p.add_argument("--plain", action="store_true", help="also time multiway without recomputation (recompute_norms=False)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    # worker-only arguments
    p.add_argument("--worker", choices=("multiway", "multiway_plain", "torchscale"), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    p.add_argument("--output-file", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        result = worker(a.worker, a.mode, json.loads(a.config_json), a.weights, a.batch, a.text_len, a.iters, a.device, a.output_file)
        print(json.dumps(result))
        return

    import multiway
    from multiway.config import apply_overrides

    cfg_obj = apply_overrides(multiway.get_config(a.preset), a.overrides)
    keys = ("depth", "embed_dim", "num_heads", "ffn_dim", "img_size", "patch_size", "vocab_size", "max_text_positions")
    cfg = {k: getattr(cfg_obj, k) for k in keys}
    impls = [("multiway", sys.executable)] + ([("multiway_plain", sys.executable)] if a.plain else [])
    if a.torchscale_python:
        impls.append(("torchscale", a.torchscale_python))
    else:
        try:
            import torchscale  # noqa: F401

            impls.append(("torchscale", sys.executable))
        except ImportError:
            print("torchscale not importable and --torchscale-python not given: timing multiway only", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.safetensors")
        model = multiway.create_model("beit3_base_patch16_224", **cfg)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        del model
        common = ["--weights", weights, "--config-json", json.dumps(cfg), "--batch", str(a.batch), "--text-len", str(a.text_len),
                  "--iters", str(a.iters), "--device", a.device]
        best: dict[tuple[str, str], dict] = {}
        runs: list[dict] = []  # every measurement, in the order taken (the implementations alternate)
        max_diff: dict[str, float] = {}
        for mode in a.modes:
            for _ in range(a.repeats):
                for impl, python in impls:
                    out_file = os.path.join(tmp, f"{impl}_{mode}.pt")
                    r = _spawn(python, impl, mode, common, out_file)
                    runs.append(dict(r))
                    prev = best.get((impl, mode))
                    if prev is None:
                        best[(impl, mode)] = r
                    else:  # keep the fastest times, the smallest memory reading
                        for k in ("fwd_samples_per_s", "train_samples_per_s"):
                            prev[k] = max(prev[k], r[k])
                        prev["train_peak_mb"] = min(prev["train_peak_mb"], r["train_peak_mb"])
            if "torchscale" in dict(impls):
                ours, ref = (torch.load(os.path.join(tmp, f"{i}_{mode}.pt")) for i in ("multiway", "torchscale"))
                max_diff[mode] = (ours - ref).abs().max().item()

    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    has_ref = "torchscale" in dict(impls)
    print(f"\n{a.preset} {cfg} batch {a.batch}, text {a.text_len} tokens, {device_name}, torch {torch.__version__}")
    header = f"{'mode':<7} {'impl':<15} {'fwd samples/s':>14} {'fwd+bwd samples/s':>18} {'train peak MiB':>15}"
    print(header + (f" {'speed ratio':>11} {'mem ratio':>9} {'max|Δ|':>9}" if has_ref else ""))
    rows = []
    for mode in a.modes:
        for impl, _ in impls:
            r = best[(impl, mode)]
            mine = [x for x in runs if x["impl"] == impl and x["mode"] == mode]
            # the spread over the repeats: the CPU is shared, so single readings move by several percent
            r["repeats"] = len(mine)
            for k in ("fwd_samples_per_s", "train_samples_per_s", "train_peak_mb"):
                r[f"{k}_range"] = [min(x[k] for x in mine), max(x[k] for x in mine)]
            line = f"{mode:<7} {impl:<15} {r['fwd_samples_per_s']:>14.2f} {r['train_samples_per_s']:>18.2f} {r['train_peak_mb']:>15.0f}"
            if has_ref and impl != "torchscale":
                ref = best[("torchscale", mode)]
                r["train_speed_ratio"] = r["train_samples_per_s"] / ref["train_samples_per_s"]
                r["fwd_speed_ratio"] = r["fwd_samples_per_s"] / ref["fwd_samples_per_s"]
                r["train_memory_ratio"] = r["train_peak_mb"] / max(ref["train_peak_mb"], 1e-9)
                r["max_abs_diff"] = max_diff[mode]
                line += f" {r['train_speed_ratio']:>10.2f}x {r['train_memory_ratio']:>8.2f}x {r['max_abs_diff']:>9.1e}"
            print(line)
            rows.append(r)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"preset": a.preset, "config": cfg, "batch": a.batch, "text_len": a.text_len, "device": device_name,
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg()}
        Path(a.out).write_text(json.dumps({"meta": meta, "results": rows, "runs": runs}, indent=2))

if __name__ == "__main__":
    main()
