"""Dense-path cost of the vision encoder at detection resolution: ViTDet window attention vs global attention.

``forward_intermediates`` of ``beit3_base_patch16_224`` on a 1024 x 1024 image (a 64 x 64 patch grid, 4096 tokens):
global attention in every block, or 14 x 14 windows (the grid padded to 70 x 70: 25 windows) with blocks 2, 5, 8
and 11 global (ViTDet's base setting). Each (mode, phase) runs in its own process so its peak memory is its own:
forward under ``no_grad`` and forward + backward. Peak memory is CUDA's ``max_memory_allocated`` on GPU and the
process's peak resident set size above the resident size after building the model on CPU.

    python benchmarks/dense_window.py --device cpu --batch 1 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import seconds_per_call  # noqa: E402

MODES = {"global": {}, "window": {"window_size": 14, "global_attention_interval": 3}}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(mode: str, phase: str, args: argparse.Namespace) -> dict:
    """One (mode, phase) in this process: seconds per call and peak memory in MiB."""
    from multiway.model.config import get_config
    from multiway.model.multiway import MultiwayTransformer

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MultiwayTransformer(get_config(args.preset, **MODES[mode])).to(device)
    image = torch.randn(args.batch, 3, args.size, args.size, device=device)
    base_rss = _peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    if phase == "forward":
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model.forward_intermediates(image, indices=[-1], intermediates_only=True)
    else:
        model.train()

        def step() -> None:
            maps = model.forward_intermediates(image, indices=[-1], intermediates_only=True)
            maps[-1].float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    seconds = seconds_per_call(step, device, args.steps, args.warmup)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
    else:
        peak = _peak_rss_mib() - base_rss
    return {"mode": mode, "phase": phase, "seconds": round(seconds, 3), "images_per_s": round(args.batch / seconds, 4),
            "peak_memory_mib": round(peak, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="beit3_base_patch16_224")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/dense_window_<device>.json)")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "PHASE"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args)))
        return
    rows = []
    for mode in MODES:
        for phase in ("forward", "forward_backward"):
            child = [sys.executable, __file__, "--one", mode, phase, "--preset", args.preset, "--size", str(args.size),
                     "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    by = {(r["mode"], r["phase"]): r for r in rows}
    summary = {}
    for phase in ("forward", "forward_backward"):
        glob, win = by[("global", phase)], by[("window", phase)]
        summary[phase] = {"window_speedup": round(glob["seconds"] / win["seconds"], 2),
                          "window_memory_ratio": round(win["peak_memory_mib"] / max(glob["peak_memory_mib"], 1e-9), 3)}
    result = {"benchmark": "dense_window", "preset": args.preset, "image": [args.size, args.size], "batch": args.batch,
              "window": MODES["window"], "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "steps": args.steps, "warmup": args.warmup, "rows": rows, "summary": summary}
    path = Path(args.out or Path(__file__).parent / "results" / f"dense_window_{args.device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
