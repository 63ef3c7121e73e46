"""Speed and memory of a fine-tuning step: VQAv2 (fusion encoder) and COCO retrieval (dual encoder).

One step is forward + backward + AdamW update of the task model through the task's own loss
(:meth:`multiway.downstream.tasks.DownstreamTask.loss`: BCE over the answer vocabulary for VQA, the CLIP loss for
retrieval) on
synthetic tensors (no data loading), at the official recipes' resolutions: VQAv2 at 480 px with 3129 answers
and 32-token questions, retrieval at 384 px with 64-token captions. bf16 autocast + SDPA on CUDA, fp32 on CPU.

    python benchmarks/finetune_step.py                                     # GPU: beit3_base, official per-GPU batches
    python benchmarks/finetune_step.py --grad-checkpointing --batch retrieval=192   # the official retrieval setting
    python benchmarks/finetune_step.py --size tiny --steps 2 --warmup 1    # CPU smoke run (beit3_tiny_patch8_32)

Default batches are the official per-GPU ones for VQA (16) and a retrieval batch that fits without activation
checkpointing (64; the official 192 per GPU uses ``--grad-checkpointing``). Writes a table to stdout and JSON to
``--out`` (default ``benchmarks/results/finetune_step_<size>_<device>.json``).
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
from multiway.downstream.tasks import get_task
from multiway.train.optim import param_groups

# task -> (model suffix, image size for base/large, text length, default batch per device)
TASKS = {"vqav2": ("vqav2", 480, 32, 16), "coco_retrieval": ("retrieval", 384, 64, 64)}
SIZES = {"tiny": "beit3_tiny_patch8_32", "base": "beit3_base_patch16", "large": "beit3_large_patch16"}


def model_name(size: str, task: str) -> str:
    suffix, img, _, _ = TASKS[task]
    return f"{SIZES[size]}_{suffix}" if size == "tiny" else f"{SIZES[size]}_{img}_{suffix}"


def make_batch(task: str, cfg, batch: int, text_len: int, num_answers: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (batch, text_len), generator=g)
    out = {
        "image": torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g),
        "language_tokens": ids,
        "padding_mask": torch.zeros_like(ids),
    }
    if task == "vqav2":  # soft scores over the answer vocabulary, a few answers per question
        labels = torch.zeros(batch, num_answers)
        labels.scatter_(1, torch.randint(0, num_answers, (batch, 3), generator=g), torch.tensor([1.0, 0.6, 0.3]).expand(batch, 3))
        out["labels"] = labels
    return {k: v.to(device) for k, v in out.items()}


def bench(model, opt, task, batch: dict, device: torch.device, amp: bool, steps: int, warmup: int) -> float:
    def one() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return seconds_per_call(one, device, steps, warmup)


def parse_batches(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        task, sep, value = item.partition("=")
        if not sep or task not in TASKS or not value.isdigit():
            raise SystemExit(f"--batch expects TASK=N with TASK in {sorted(TASKS)}, got {item!r}")
        out[task] = int(value)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base", choices=sorted(SIZES))
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--batch", nargs="*", default=[], help="per-device batch overrides: vqav2=16 coco_retrieval=192")
    ap.add_argument("--num-answers", type=int, default=3129)
    add_step_arguments(ap)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    amp = device.type == "cuda"
    batches = {t: TASKS[t][3] for t in TASKS} | parse_batches(args.batch)
    rows = []
    for task in args.tasks:
        spec = get_task(task)()
        kwargs = {"num_classes": args.num_answers} if task == "vqav2" else {}
        model = multiway.create_model(model_name(args.size, task), grad_checkpointing=args.grad_checkpointing, **kwargs).to(device)
        opt = torch.optim.AdamW(param_groups(model), lr=1e-5, **({"fused": True} if amp else {}))
        forward = torch.compile(model) if args.compile else model
        text_len = min(TASKS[task][2], model.config.max_text_positions - 2)  # the tiny preset holds 62 tokens
        batch = make_batch(task, model.config, batches[task], text_len, args.num_answers, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = bench(forward, opt, spec, batch, device, amp, args.steps, args.warmup)
        peak = (
            torch.cuda.max_memory_allocated() / 2**30
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )
        rows.append(
            {
                "task": task,
                "model": model_name(args.size, task),
                "img_size": model.config.img_size,
                "text_len": text_len,
                "batch": batches[task],
                "step_ms": sec * 1e3,
                "samples_per_s": batches[task] / sec,
                "peak_mem_gib": peak,
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
        del model, opt, forward, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if amp else "fp32",
        "torch": torch.__version__,
        "grad_checkpointing": args.grad_checkpointing,
        "compile": args.compile,
        "peak_mem_note": "CUDA max_memory_allocated" if device.type == "cuda" else "process max RSS (whole process)",
    }
    print(f"fine-tuning steps on {env['device']} ({env['precision']}, {env['threads']} threads)")
    print(f"{'task':<15} {'model':<34} {'px':>4} {'batch':>5} {'ms/step':>9} {'samples/s':>10} {'peak GiB':>8}")
    for r in rows:
        print(
            f"{r['task']:<15} {r['model']:<34} {r['img_size']:>4} {r['batch']:>5} {r['step_ms']:>9.1f} "
            f"{r['samples_per_s']:>10.2f} {r['peak_mem_gib']:>8.2f}"
        )
    out = Path(args.out or f"benchmarks/results/finetune_step_{args.size}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"env": env, "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    print(out)
    return result


if __name__ == "__main__":
    main()
