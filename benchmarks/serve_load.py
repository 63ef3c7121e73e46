"""The demo server under load on localhost: N concurrent clients for a bounded time and count; latency p50/p99
per endpoint, status codes, throughput, server memory before and after.

    python benchmarks/serve_load.py --quickstart quickstart            # the quickstart's models and test images
    python benchmarks/serve_load.py --quickstart quickstart --clients 16 --seconds 20

Builds ``<quickstart>/index`` from ``data/images/test`` if it is missing, starts ``multiway serve`` in a child
process on 127.0.0.1 and drives it with :func:`multiway.serve.loadtest.run_load`. Writes
benchmarks/results/serve_load_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from multiway.index import IndexConfig, build_index
from multiway.serve.loadtest import rss_mb, run_load, server_process


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quickstart", default="quickstart", help="a `multiway quickstart` output folder")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP threads of the server process")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load_cpu.json"))
    args = ap.parse_args(argv)
    qs = Path(args.quickstart)
    runs, images, index = qs / "runs", qs / "data" / "images" / "test", qs / "index"
    if not runs.is_dir():
        raise SystemExit(f"{qs}: not a quickstart output folder (run `multiway quickstart` first)")
    if not (index / "vectors.faiss").is_file():
        build_index([images], index, IndexConfig(model=str(runs / "coco_retrieval_pretrained"), progress=False))
    image = sorted(images.glob("*.png"))[0].read_bytes()
    upload = {"image": ("q.png", image, "image/png")}
    plan = [("search text", {"method": "GET", "url": "/api/search?q=a+red+circle&topk=8"}),
            ("search image", {"method": "POST", "url": "/api/search", "files": upload}),
            ("embed text", {"method": "POST", "url": "/api/embed", "data": {"text": "a blue square"}}),
            ("caption", {"method": "POST", "url": "/api/caption", "files": upload}),
            ("vqa", {"method": "POST", "url": "/api/vqa", "files": upload, "data": {"question": "what color is the shape?"}})]
    serve_args = ["--index", str(index), "--captioner", str(runs / "coco_captioning_pretrained"), "--vqa", str(runs / "vqav2_pretrained")]
    with server_process(serve_args, env={"OMP_NUM_THREADS": str(args.threads)}) as (base, proc):
        run_load(base, plan, clients=2, duration_s=2.0, max_requests=50)  # warm-up
        before = rss_mb(proc.pid)
        report = run_load(base, plan, clients=args.clients, duration_s=args.seconds, max_requests=args.max_requests)
        after = rss_mb(proc.pid)
        alive = proc.poll() is None
    result = {"env": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "server_threads": args.threads,
                      "load_avg": os.getloadavg()[0], "clients": args.clients, "seconds": args.seconds, "max_requests": args.max_requests,
                      "models": str(runs)},
              "requests": report.requests, "statuses": report.statuses, "failures": report.failures[:10], "rps": report.rps,
              "latency_ms": report.latency_ms, "rss_mb_before": before, "rss_mb_after": after, "server_alive": alive}
    print(f"{args.clients} clients, {report.seconds:.1f} s, {report.requests} requests, {report.rps:.1f} req/s, "
          f"statuses {report.statuses}, "
          f"{len(report.failures)} transport failures; server RSS {before:.0f} -> {after:.0f} MiB")
    print(f"{'endpoint':<14}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}")
    for name, s in report.latency_ms.items():
        print(f"{name:<14}{s['n']:>6}{s['p50']:>9.1f}{s['p99']:>9.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
