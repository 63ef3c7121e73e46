"""The image index on this CPU: build throughput (images/s, embedding included) and query latency at 10k and
100k vectors, exact (IndexFlatIP) and IVF-PQ, with IVF-PQ's recall@10 against exact search.

    python benchmarks/index_search.py                        # build with beit3_tiny_patch8_32, vectors of D=768
    python benchmarks/index_search.py --images 2000 --sizes 10000 100000 --dim 768

Build: ``multiway.index.build_index`` over ``--images`` generated PNG files (the built-in shapes at the model's size)
with a randomly initialised retrieval model (speed does not depend on the weights). Search: synthetic unit vectors
drawn around 4096 random centres (embeddings cluster; uniform random vectors would be a worst case for IVF), query
vectors are held-out draws. Writes benchmarks/results/index_search_cpu.json.
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
from multiway.index import IndexConfig, build_faiss, build_index


def synthetic_vectors(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    v = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def bench_build(model_name: str, n_images: int, batch_size: int, tmp: Path) -> dict:
    from PIL import Image

    torch.manual_seed(0)
    model = multiway.create_model(model_name)
    multiway.save_pretrained(model, tmp / "model.safetensors")
    size = model.config.img_size
    rng = np.random.default_rng(0)
    folder = tmp / "images"
    folder.mkdir()
    for i in range(n_images):  # coloured squares at random places: decodable PNGs of the model's size
        im = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(0, 255, 3)))
        x, y = rng.integers(0, size // 2, 2)
        im.paste(tuple(int(c) for c in rng.integers(0, 255, 3)), (int(x), int(y), int(x) + size // 3, int(y) + size // 3))
        im.save(folder / f"{i:06d}.png")
    cfg = IndexConfig(model=str(tmp / "model.safetensors"), batch_size=batch_size, progress=False, device="cpu")
    t = time.perf_counter()
    report = build_index([folder], tmp / "idx", cfg)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    again = build_index([folder], tmp / "idx", cfg)  # nothing changed: the incremental path only stats the files
    noop = time.perf_counter() - t
    return {"model": model_name, "img_size": size, "images": n_images, "batch_size": batch_size, "seconds": seconds,
            "images_per_s": report.embedded / seconds, "unchanged_rescan_s": noop, "unchanged": again.unchanged}


def bench_search(n: int, dim: int, kind: str, rng: np.random.Generator, centres: np.ndarray, queries: int = 200) -> dict:
    vectors = synthetic_vectors(n, dim, rng, centres)
    q = synthetic_vectors(queries, dim, rng, centres)
    t = time.perf_counter()
    index = build_faiss(np.arange(n), vectors, kind=kind)
    build_s = time.perf_counter() - t
    one = []
    for i in range(queries):
        t = time.perf_counter()
        index.search(q[i : i + 1], 10)
        one.append(1000 * (time.perf_counter() - t))
    t = time.perf_counter()
    _, found = index.search(q, 10)
    batch_ms = 1000 * (time.perf_counter() - t)
    exact = np.argsort(-(q @ vectors.T), axis=1)[:, :10]
    recall = float(np.mean([len(set(found[i]) & set(exact[i])) / 10 for i in range(queries)]))
    return {"vectors": n, "dim": dim, "kind": kind, "build_s": build_s, "query_ms_p50": float(np.percentile(one, 50)),
            "query_ms_p99": float(np.percentile(one, 99)), f"batch{queries}_ms": batch_ms, "recall_at_10": recall}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="beit3_tiny_patch8_32_retrieval")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=768, help="vector dimension of the search benchmark (base models: 768)")
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivfpq"], choices=["flat", "ivfpq"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_search_cpu.json"))
    args = ap.parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build = bench_build(args.model, args.images, args.batch_size, Path(tmp))
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4096, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    search = [bench_search(n, args.dim, kind, rng, centres) for n in args.sizes for kind in args.kinds]
    result = {"env": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                      "load_avg": os.getloadavg()[0], "faiss": faiss.__version__, "torch": torch.__version__},
              "build": build, "search": search}
    print(f"build: {build['images']} images of {build['img_size']} px with {build['model']}: {build['images_per_s']:.1f} images/s "
          f"(batch {build['batch_size']}); unchanged re-scan {build['unchanged_rescan_s']:.2f} s")
    print(f"{'vectors':>8} {'kind':<6}{'build s':>9}{'p50 ms':>9}{'p99 ms':>9}{'200 q ms':>10}{'recall@10':>11}")
    for r in search:
        print(f"{r['vectors']:>8} {r['kind']:<6}{r['build_s']:>9.2f}{r['query_ms_p50']:>9.3f}{r['query_ms_p99']:>9.3f}"
              f"{r['batch200_ms']:>10.1f}{r['recall_at_10']:>11.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
