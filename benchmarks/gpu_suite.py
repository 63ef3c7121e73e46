"""The prepared GPU suite: every GPU claim of multiway measured in one run of at most ~8 minutes, one JSON file.

    python benchmarks/gpu_suite.py                 # on one H100/H200: writes benchmarks/results/gpu_suite_<gpu>.json
    python benchmarks/gpu_suite.py --size tiny     # the same sections at tiny sizes (CPU test, a minute)

Sections (each in its own processes, so a failure or an out-of-memory is recorded and the suite goes on):

1. ``backbone``: beit3_base forward and forward+backward in bf16 autocast, vision / text / fused, beside the
   official torchscale code with the same weights in the same run (``benchmarks/backbone.py``). torchscale and its
   pins (timm 0.6.13, fairscale 0.4.0) come from ``benchmarks/wheels/`` and are installed offline into a private
   folder that only the torchscale workers see.
2. ``pretraining``: the masked-data-modeling step of base and large (samples/s, MFU; ``benchmarks/pretrain_step.py``).
3. ``giant_fsdp``: the 1.9B giant's pretraining step on one GPU under FSDP2 with activation checkpointing, at the
   largest batch that runs (tried from the planner's fit downwards).
4. ``finetuning``: VQAv2 at 480 px and retrieval at 384 px (batch 64, and 192 with checkpointing) through the task
   losses (samples/s, peak memory; ``benchmarks/finetune_step.py``).
5. ``plans``: ``multiway plan`` for each measured configuration, its peak beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
WHEELS = BENCH / "wheels"

# per size: the models, batches and step counts of each section
SIZES = {
    "gpu": {
        "backbone": {"preset": "beit3_base_patch16_224", "overrides": [], "batch": 32, "text_len": 64, "iters": 10,
                     "modes": ["vision", "text", "fused"]},
        "pretraining": [{"model": "beit3_base_patch16_224", "batch": 64}, {"model": "beit3_large_patch16_224", "batch": 32}],
        "pretrain_text_len": 64, "pretrain_codebook": 8192, "steps": 10, "warmup": 3,
        "giant": {"model": "beit3_giant_patch14_224", "batches": [48, 32, 24, 16, 8, 4], "text_len": 64},
        "finetune_size": "base", "finetune_batches": ["vqav2=16", "coco_retrieval=64"], "retrieval_ac_batch": 192,
    },
    "tiny": {
        "backbone": {"preset": "beit3_base_patch16_224", "batch": 2, "text_len": 8, "iters": 1, "modes": ["fused"],
                     "overrides": ["depth=2", "embed_dim=64", "num_heads=4", "ffn_dim=128", "img_size=32", "vocab_size=500"]},
        "pretraining": [{"model": "beit3_tiny_patch8_32", "batch": 4}],
        "pretrain_text_len": 16, "pretrain_codebook": 64, "steps": 1, "warmup": 1,
        "giant": {"model": "beit3_tiny_patch8_32_paper", "batches": [4, 2], "text_len": 16},
        "finetune_size": "tiny", "finetune_batches": ["vqav2=4", "coco_retrieval=4"], "retrieval_ac_batch": 6,
    },
}


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one benchmark process; its wall time, exit status and (on failure) the end of its stderr."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - start}
    out = {"ok": proc.returncode == 0, "seconds": time.perf_counter() - start}
    if proc.returncode:
        out["error"] = proc.stderr[-2000:]
    return out


def _env(extra_path: str | None = None) -> dict:
    paths = [str(ROOT), str(BENCH)] + ([extra_path] if extra_path else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))


def torchscale_python(workdir: Path) -> str:
    """An interpreter command that imports torchscale 0.3.0 (and its pinned timm/fairscale) from the wheels in the
    working tree, installed offline into ``workdir``; multiway's own processes keep their timm."""
    site = workdir / "torchscale_site"
    wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no wheels in {WHEELS}: expected torchscale, timm 0.6.13 and fairscale 0.4.0 (see benchmarks/README.md)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), *wheels],
                   check=True, capture_output=True, text=True)
    wrapper = workdir / "torchscale-python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{site}:$PYTHONPATH" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def backbone(size: dict, device: str, workdir: Path, timeout: float) -> dict:
    s = size["backbone"]
    out = workdir / "backbone.json"
    cmd = [sys.executable, str(BENCH / "backbone.py"), "--preset", s["preset"], *s["overrides"], "--batch", str(s["batch"]),
           "--text-len", str(s["text_len"]), "--iters", str(s["iters"]), "--device", device, "--modes", *s["modes"],
           "--torchscale-python", torchscale_python(workdir), "--out", str(out)]
    result = _run(cmd, timeout, _env())
    if result["ok"]:
        result.update(json.loads(out.read_text()))
    return result


def pretraining(size: dict, device: str, workdir: Path, timeout: float) -> list[dict]:
    rows = []
    for m in size["pretraining"]:
        out = workdir / f"pretrain_{m['model']}.json"
        cmd = [sys.executable, str(BENCH / "pretrain_step.py"), "--model", m["model"], "--batch", str(m["batch"]),
               "--text-len", str(size["pretrain_text_len"]), "--codebook", str(size["pretrain_codebook"]),
               "--steps", str(size["steps"]), "--warmup", str(size["warmup"]), "--device", device, "--out", str(out)]
        result = {"model": m["model"], "batch_per_stream": m["batch"], **_run(cmd, timeout, _env())}
        if result["ok"]:
            result.update(json.loads(out.read_text()))
        rows.append(result)
    return rows


def finetuning(size: dict, device: str, workdir: Path, timeout: float) -> list[dict]:
    rows = []
    runs = [(size["finetune_batches"], False), ([f"coco_retrieval={size['retrieval_ac_batch']}"], True)]
    for i, (batches, ac) in enumerate(runs):
        out = workdir / f"finetune_{i}.json"
        tasks = sorted({b.split("=")[0] for b in batches})
        cmd = [sys.executable, str(BENCH / "finetune_step.py"), "--size", size["finetune_size"], "--tasks", *tasks,
               "--batch", *batches, "--steps", str(size["steps"]), "--warmup", str(size["warmup"]), "--device", device,
               "--out", str(out), *(["--grad-checkpointing"] if ac else [])]
        result = {"grad_checkpointing": ac, **_run(cmd, timeout, _env())}
        if result["ok"]:
            result.update(json.loads(out.read_text()))
        rows.append(result)
    return rows


def giant_worker(model: str, batch: int, text_len: int, steps: int, device: str) -> dict:
    """One process: the pretraining step of ``model`` under FSDP2 (one rank) with full activation checkpointing."""
    import torch.distributed as dist
    from pretrain_step import make_batch, step_flops
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import multiway
    from multiway.train.objectives import mdm_loss

    cuda = device.startswith("cuda")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    dev = torch.device(device)
    model_ = multiway.create_model(f"{model}_pretraining", grad_checkpointing=True).to(dev)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    mesh = init_device_mesh(dev.type, (1,))
    for block in model_.beit3.encoder.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model_, mesh=mesh, mp_policy=mp)
    opt = torch.optim.AdamW(model_.parameters(), lr=1e-4)
    data = make_batch(model_.config, batch, text_len, model_.codebook_size, dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = mdm_loss(model_, data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up, optimizer states
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    samples = 3 * batch
    peak = torch.cuda.max_memory_allocated() if cuda else None
    dist.destroy_process_group()
    return {"batch_per_stream": batch, "samples_per_s": samples / seconds, "step_ms": 1e3 * seconds, "peak_bytes": peak,
            "tflops_per_s": step_flops(model_.config, data, model_.codebook_size) / seconds / 1e12}


def giant_fsdp(size: dict, device: str, timeout: float, planned_batch: int | None) -> dict:
    g = size["giant"]
    batches = sorted({*g["batches"], *([planned_batch] if planned_batch else [])}, reverse=True)
    tried = []
    for batch in batches:  # largest first; stop at the first that runs
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--giant-worker", g["model"], "--giant-batch", str(batch), "--giant-text-len",
               str(g["text_len"]), "--device", device, "--worker-out", out, "--size", "tiny" if "tiny" in g["model"] else "gpu"]
        result = {"batch_per_stream": batch, **_run(cmd, timeout, _env())}
        if result["ok"]:
            result.update(json.loads(Path(out).read_text()))
            tried.append(result)
            return {"model": g["model"], "fits": True, "batch_per_stream": batch, "result": result, "tried": tried}
        result["error"] = result.get("error", "")[-500:]
        tried.append(result)
    return {"model": g["model"], "fits": False, "tried": tried}


def plans(size_name: str, size: dict, gpu: str) -> dict:
    """The planner's estimate for each configuration the suite measures (bf16 autocast on ``gpu``)."""
    from multiway.planning import PlanConfig, fit_batch, plan

    common = {"gpu": gpu, "precision": "bf16-autocast"}
    out: dict[str, dict] = {}
    b = size["backbone"]
    if size_name == "gpu":  # the tiny backbone overrides are not a preset; its plan is the pretraining one below
        out["backbone_fused"] = plan(PlanConfig(model=b["preset"], batch=b["batch"], text_len=b["text_len"], **common)).to_dict()
    for m in size["pretraining"]:
        cfg = PlanConfig(model=f"{m['model']}_pretraining", batch=m["batch"], text_len=size["pretrain_text_len"],
                         codebook_size=size["pretrain_codebook"], **common)
        out[f"pretraining_{m['model']}"] = plan(cfg).to_dict()
    g = size["giant"]
    giant = PlanConfig(model=f"{g['model']}_pretraining", text_len=g["text_len"], ac="full", strategy="fsdp2", world_size=1,
                       codebook_size=size["pretrain_codebook"], **common)
    batch, report = fit_batch(giant)
    out["giant_fsdp_fit"] = {"batch_per_stream": batch, **report.to_dict()}
    prefix = {"tiny": "beit3_tiny_patch8_32", "base": "beit3_base_patch16"}[size["finetune_size"]]
    vqa_model = f"{prefix}_vqav2" if size_name == "tiny" else f"{prefix}_480_vqav2"
    ret_model = f"{prefix}_retrieval" if size_name == "tiny" else f"{prefix}_384_retrieval"
    batches = dict(x.split("=") for x in size["finetune_batches"])
    out["vqav2"] = plan(PlanConfig(model=vqa_model, batch=int(batches["vqav2"]), text_len=32, **common)).to_dict()
    out["coco_retrieval"] = plan(PlanConfig(model=ret_model, batch=int(batches["coco_retrieval"]), text_len=64, **common)).to_dict()
    out["coco_retrieval_ac"] = plan(PlanConfig(model=ret_model, batch=size["retrieval_ac_batch"], text_len=64, ac="full",
                                               **common)).to_dict()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="gpu", choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", nargs="*", default=["plans", "backbone", "pretraining", "giant_fsdp", "finetuning"])
    ap.add_argument("--section-timeout", type=float, default=150.0, help="seconds per benchmark process")
    ap.add_argument("--out", default=None, help="default benchmarks/results/gpu_suite_<device>.json")
    ap.add_argument("--giant-worker", help=argparse.SUPPRESS)
    ap.add_argument("--giant-batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--giant-text-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    size = SIZES[args.size]

    if args.giant_worker:
        result = giant_worker(args.giant_worker, args.giant_batch, args.giant_text_len, size["steps"], args.device)
        Path(args.worker_out).write_text(json.dumps(result))
        return result

    started = time.perf_counter()
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    gpu = "h200" if "H200" in name else "a100" if "A100" in name else "h100"
    report: dict = {"env": {"device": name, "planned_for": gpu, "torch": torch.__version__, "size": args.size,
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for section in args.sections:
            t0 = time.perf_counter()
            try:
                if section == "plans":
                    report["plans"] = plans(args.size, size, gpu)
                elif section == "backbone":
                    report["backbone"] = backbone(size, args.device, work, args.section_timeout)
                elif section == "pretraining":
                    report["pretraining"] = pretraining(size, args.device, work, args.section_timeout)
                elif section == "giant_fsdp":
                    fit = report.get("plans", {}).get("giant_fsdp_fit", {}).get("batch_per_stream")
                    report["giant_fsdp"] = giant_fsdp(size, args.device, args.section_timeout, fit)
                elif section == "finetuning":
                    report["finetuning"] = finetuning(size, args.device, work, args.section_timeout)
                else:
                    raise ValueError(f"unknown section {section!r}")
            except Exception as e:  # record and go on: one broken section must not cost the GPU window
                report[section] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            report.setdefault("section_seconds", {})[section] = time.perf_counter() - t0
            print(f"{section}: {report['section_seconds'][section]:.0f} s", flush=True)
    report["comparison"] = compare(report)
    report["total_seconds"] = time.perf_counter() - started
    out = Path(args.out or BENCH / "results" / f"gpu_suite_{gpu if cuda else 'cpu_' + args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report["comparison"], indent=1))
    print(out)
    return report


def compare(report: dict) -> list[dict]:
    """Planned beside measured peak memory (CUDA ``max_memory_allocated``) and throughput where both exist."""
    plans_, rows = report.get("plans", {}), []
    if not isinstance(plans_, dict) or "error" in plans_:
        return rows

    def row(what: str, plan_key: str, measured_bytes: float | None, measured_samples_s: float | None) -> None:
        p = plans_.get(plan_key)
        if p:
            rows.append({"what": what, "planned_peak_bytes": p["peak_bytes_per_rank"], "measured_peak_bytes": measured_bytes,
                         "planned_samples_per_s": p["samples_per_step"] / p["step_seconds"], "measured_samples_per_s": measured_samples_s})

    for r in report.get("pretraining", []) if isinstance(report.get("pretraining"), list) else []:
        mixed = next((x for x in r.get("rows", []) if x["stream"] == "mixed"), None)
        if mixed:
            measured = mixed["peak_mem_gib"] * 2**30 if r.get("env", {}).get("peak_mem_note", "").startswith("CUDA") else None
            row(f"pretraining {r['model']}", f"pretraining_{r['model']}", measured, mixed["samples_per_s"])
    for r in report.get("finetuning", []) if isinstance(report.get("finetuning"), list) else []:
        for x in r.get("rows", []):
            key = x["task"] + ("_ac" if r["grad_checkpointing"] else "")
            measured = x["peak_mem_gib"] * 2**30 if r.get("env", {}).get("peak_mem_note", "").startswith("CUDA") else None
            row(f"{x['task']} batch {x['batch']}{' (AC)' if r['grad_checkpointing'] else ''}", key, measured, x["samples_per_s"])
    g = report.get("giant_fsdp", {})
    if isinstance(g, dict) and g.get("fits"):
        rows.append({"what": f"giant FSDP2+AC batch {g['batch_per_stream']}", "measured_peak_bytes": g["result"].get("peak_bytes"),
                     "planned_fit_batch": plans_.get("giant_fsdp_fit", {}).get("batch_per_stream"),
                     "measured_samples_per_s": g["result"]["samples_per_s"]})
    return rows


if __name__ == "__main__":
    main()
