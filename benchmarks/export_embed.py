"""Image embedding on this CPU: onnxruntime vs PyTorch eager (fp32), batch 1 and batch 32, in the same run.

    python benchmarks/export_embed.py                                   # beit3_base_patch16_224_retrieval
    python benchmarks/export_embed.py --model beit3_tiny_patch8_32_retrieval --steps 5

The model is built from its preset (random weights: speed does not depend on them), exported with
``multiway.export`` (part ``vision``: normalisation in the graph) and both runtimes get the same thread count.
Prints a table and writes JSON to benchmarks/results/export_embed_<model>_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import multiway
from multiway.export import VisionEmbedder, export_model


def time_calls(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="beit3_base_patch16_224_retrieval")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", help="JSON path (default benchmarks/results/export_embed_<model>_cpu.json)")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = multiway.create_model(args.model).eval()
    size = model.config.img_size
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        spec = export_model(model, part="vision", fmt="onnx", out=Path(tmp) / "vision.onnx")
        export_s = time.perf_counter() - t
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(spec.path, opts, providers=["CPUExecutionProvider"])
    eager = VisionEmbedder(model, spec.mean, spec.std).eval()
    rows: list[dict] = []
    result = {"env": {"model": args.model, "img_size": size, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "load_avg": os.getloadavg()[0], "torch": torch.__version__, "onnxruntime": ort.__version__,
                      "precision": "fp32", "steps": args.steps, "statistic": "median", "export_s": round(export_s, 1)},
              "rows": rows}
    out = Path(args.out or Path(__file__).parent / "results" / f"export_embed_{args.model}_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for batch in args.batches:
        pixels = torch.rand(batch, 3, size, size)
        feed = {"pixels": pixels.numpy()}
        with torch.inference_mode():
            diff = float(np.abs(session.run(None, feed)[0] - eager(pixels).numpy()).max())
            t_eager = time_calls(lambda x=pixels: eager(x), args.steps, args.warmup)
        t_ort = time_calls(lambda f=feed: session.run(None, f), args.steps, args.warmup)
        for runtime, times in (("pytorch eager", t_eager), ("onnxruntime", t_ort)):
            ms = 1000 * float(np.median(times))
            rows.append({"runtime": runtime, "batch": batch, "ms_per_batch": ms, "images_per_s": batch / (ms / 1000), "max_abs_diff": diff})
        out.write_text(json.dumps(result, indent=2))  # after each batch size: a long run keeps what it measured
    print(f"{args.model} ({size} px), {args.threads} threads, fp32, median of {args.steps} calls; export {export_s:.0f} s")
    print(f"{'runtime':<15}{'batch':>6}{'ms/batch':>12}{'images/s':>11}{'max|diff|':>11}")
    for r in rows:
        print(f"{r['runtime']:<15}{r['batch']:>6}{r['ms_per_batch']:>12.1f}{r['images_per_s']:>11.1f}{r['max_abs_diff']:>11.1e}")
    return result


if __name__ == "__main__":
    main()
