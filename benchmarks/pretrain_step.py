"""Speed of the BEiT-3 pretraining step: samples/s per stream, tokens/s, peak memory and MFU (CUDA).

One "step" is forward + backward + AdamW update of :class:`multiway.BEiT3ForPretraining` on synthetic tensors
(no data loading), for each stream alone (text-only, image-only, image-text pair) and for the mixed step
(all three streams, as in pretraining). bf16 autocast + SDPA on CUDA, fp32 on CPU.

FLOPs are counted analytically (per sample, forward + backward = 3x forward):
    6 * active_params * tokens      (each token runs one expert per sublayer; heads only on masked tokens)
  + 12 * depth * seq_len^2 * width   (attention scores and weighted values)
MFU = achieved FLOP/s / peak (``--peak-tflops``, default 989 = H100 SXM dense bf16; no MFU on CPU unless given).

    python benchmarks/pretrain_step.py --model beit3_tiny_patch8_32 --batch 32          # CPU
    python benchmarks/pretrain_step.py --model beit3_large_patch16_224 --batch 64 --grad-checkpointing   # GPU
Writes a table to stdout and JSON to ``--out`` (default benchmarks/results/pretrain_step_<model>_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
from pathlib import Path

import torch
from bench_common import add_step_arguments, seconds_per_call

import multiway
from multiway.train.objectives import mdm_loss
from multiway.train.optim import param_groups


def make_batch(cfg, batch: int, text_len: int, codebook: int, device, streams=("text", "image", "pair")) -> dict:
    g = torch.Generator().manual_seed(0)
    n = cfg.num_patches
    out = {}
    for s in streams:
        d = {}
        if s in ("text", "pair"):
            ids = torch.randint(4, cfg.vocab_size, (batch, text_len), generator=g)
            m = torch.rand(batch, text_len, generator=g) < (0.15 if s == "text" else 0.5)
            d.update(text_ids=ids, padding_mask=torch.zeros_like(ids), text_masked_positions=m, text_targets=ids[m])
        if s in ("image", "pair"):
            d["image"] = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
        if s == "image":
            m = torch.zeros(batch, n, dtype=torch.bool)
            m[:, : round(0.4 * n)] = True
            d.update(image_masked_positions=m, image_targets=torch.randint(0, codebook, (int(m.sum()),), generator=g))
        out[s] = {k: v.to(device) for k, v in d.items()}
    return out


def step_flops(cfg, streams: dict, codebook: int) -> float:
    """Training FLOPs (fwd + bwd) of one step on ``streams`` (see the module docstring)."""
    D, F, L = cfg.embed_dim, cfg.ffn_dim, cfg.depth
    per_token_layer = 4 * D * D + 2 * D * F  # one expert: q, k, v, out + fc1, fc2 (norms/biases negligible)
    patch = 3 * cfg.patch_size**2 * D
    total = 0.0
    for s in streams.values():
        B = (s.get("text_ids") if "text_ids" in s else s["image"]).shape[0]
        n_img = cfg.num_vision_tokens if "image" in s else 0
        n_txt = s["text_ids"].shape[1] if "text_ids" in s else 0
        seq = n_img + n_txt
        matmul = B * (seq * L * per_token_layer + (n_img - 1 if n_img else 0) * patch)
        heads = s["text_targets"].numel() * D * cfg.vocab_size if "text_targets" in s else 0
        heads += s["image_targets"].numel() * D * codebook if "image_targets" in s else 0
        total += 6 * (matmul + heads) + 12 * L * B * seq * seq * D
    return total


def bench(model, opt, batch: dict, device, amp, steps: int, warmup: int) -> float:
    def one():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = mdm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return seconds_per_call(one, device, steps, warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="beit3_tiny_patch8_32")
    ap.add_argument("--batch", type=int, default=32, help="samples per stream")
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--codebook", type=int, default=8192)
    add_step_arguments(ap)
    ap.add_argument("--peak-tflops", type=float, default=None, help="default 989 on CUDA (H100 SXM bf16)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    amp = device.type == "cuda"
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)
    model = multiway.create_model(f"{args.model}_pretraining", codebook_size=args.codebook, grad_checkpointing=args.grad_checkpointing).to(
        device
    )
    cfg = model.config
    opt = torch.optim.AdamW(param_groups(model), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, **({"fused": True} if amp else {}))
    fwd = torch.compile(model) if args.compile else model
    rows = []
    for name in ("text", "image", "pair", "mixed"):
        streams = ("text", "image", "pair") if name == "mixed" else (name,)
        batch = make_batch(cfg, args.batch, args.text_len, args.codebook, device, streams)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = bench(fwd, opt, batch, device, amp, args.steps, args.warmup)
        samples = args.batch * len(streams)
        tokens = sum(
            args.batch * ((cfg.num_vision_tokens if "image" in s else 0) + (args.text_len if "text_ids" in s else 0))
            for s in batch.values()
        )
        flops = step_flops(cfg, batch, args.codebook)
        peak_mem = (
            torch.cuda.max_memory_allocated() / 2**30
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )
        rows.append(
            {
                "stream": name,
                "batch": samples,
                "step_ms": sec * 1e3,
                "samples_per_s": samples / sec,
                "tokens_per_s": tokens / sec,
                "tflops_per_s": flops / sec / 1e12,
                "mfu": (flops / sec / 1e12 / peak) if peak else None,
                "peak_mem_gib": peak_mem,
            }
        )
    env = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if amp else "fp32",
        "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "text_len": args.text_len,
        "codebook": args.codebook,
        "grad_checkpointing": args.grad_checkpointing,
        "compile": args.compile,
        "peak_tflops": peak,
        "peak_mem_note": "CUDA max_memory_allocated" if device.type == "cuda" else "process max RSS (whole process)",
    }
    print(f"{args.model} on {env['device']} ({env['precision']}, {env['threads']} threads), {env['params'] / 1e6:.2f}M params")
    print(f"{'stream':<7} {'batch':>5} {'ms/step':>9} {'samples/s':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{r['stream']:<7} {r['batch']:>5} {r['step_ms']:>9.1f} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} "
            f"{r['tflops_per_s']:>8.4f} {mfu:>6} {r['peak_mem_gib']:>8.2f}"
        )
    out = Path(args.out or f"benchmarks/results/pretrain_step_{args.model}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
