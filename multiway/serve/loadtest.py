"""A bounded load generator for the demo server, and a helper that runs the server in a child process.

Used by the load test in the test suite and by ``benchmarks/serve_load.py``. It talks to loopback addresses only,
stops after ``duration_s`` seconds or ``max_requests`` requests, whichever comes first, and reports per-endpoint
latency percentiles and the status codes seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np


@dataclass
class LoadReport:
    """requests: sent; statuses: count by HTTP status; failures: transport errors (connection refused, timeouts);
    latency_ms: per endpoint {p50, p99, mean, n}; seconds: wall time; rps: completed requests per second."""

    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    rps: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)


def require_loopback(base_url: str) -> None:
    """Refuse to load anything but this machine."""
    host = urlparse(base_url).hostname or ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"base_url: the load generator only targets loopback addresses, got {base_url!r}")


async def _client(http, base_url: str, plan: Sequence[tuple[str, dict]], stop_at: float, budget: list[int],
                  samples: dict[str, list[float]], report: LoadReport, offset: int) -> None:
    i = offset
    while time.perf_counter() < stop_at and budget[0] > 0:
        budget[0] -= 1
        name, request = plan[i % len(plan)]
        i += 1
        t = time.perf_counter()
        try:
            response = await http.request(url=base_url + request["url"], **{k: v for k, v in request.items() if k != "url"})
            report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
            samples.setdefault(name, []).append(1000 * (time.perf_counter() - t))
        except Exception as e:  # a transport failure is a result of the load test, not a crash of it
            report.failures.append(f"{name}: {type(e).__name__}: {e}")
        report.requests += 1


def run_load(base_url: str, plan: Sequence[tuple[str, dict]], clients: int = 8, duration_s: float = 3.0,
             max_requests: int = 500, timeout_s: float = 30.0) -> LoadReport:
    """``clients`` concurrent clients cycle through ``plan`` (``(name, httpx request kwargs with "url" a path)``)
    for at most ``duration_s`` seconds and ``max_requests`` requests in all."""
    import httpx

    require_loopback(base_url)
    report, samples, budget = LoadReport(), {}, [max_requests]

    async def main() -> None:
        async with httpx.AsyncClient(timeout=timeout_s) as http:
            stop_at = time.perf_counter() + duration_s
            await asyncio.gather(*(_client(http, base_url, plan, stop_at, budget, samples, report, k) for k in range(clients)))

    t = time.perf_counter()
    asyncio.run(main())
    report.seconds = time.perf_counter() - t
    report.rps = sum(report.statuses.values()) / max(report.seconds, 1e-9)
    report.latency_ms = {name: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "mean": float(np.mean(v)),
                                "n": len(v)} for name, v in samples.items()}
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def server_process(args: Sequence[str], port: int | None = None, startup_s: float = 120.0, env: dict | None = None,
                   log_path: str | os.PathLike | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``multiway serve ARGS --port P`` on 127.0.0.1 in a child process (output to ``log_path``); yields
    (base URL, process) once ``/api/health`` answers, and stops the process afterwards."""
    import httpx

    port = port or free_port()
    cmd = [sys.executable, "-m", "multiway.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"multiway serve exited with {proc.returncode} before answering: {' '.join(cmd)} (log: {log_path})")
            try:
                if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"multiway serve did not answer /api/health within {startup_s} s")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
        log.close()
