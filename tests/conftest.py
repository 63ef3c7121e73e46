import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

# Under pytest-xdist each worker is its own process: one intra-op thread each avoids oversubscribing the
# cores, which slows CPU kernels by an order of magnitude.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
# The golden fixtures' config (official modules at a tiny size).
GOLDEN_CONFIG = dict(depth=2, embed_dim=64, num_heads=4, ffn_dim=256, img_size=32, patch_size=8, vocab_size=1000, max_text_positions=64)


def load_golden(name: str) -> tuple[dict, dict, dict]:
    """(state_dict, inputs, outputs) of golden/<name>.safetensors."""
    tensors = load_file(str(GOLDEN / f"{name}.safetensors"))
    groups = {"state_dict.": {}, "input.": {}, "output.": {}}
    for key, value in tensors.items():
        for prefix, group in groups.items():
            if key.startswith(prefix):
                group[key[len(prefix):]] = value
    return groups["state_dict."], groups["input."], groups["output."]


def golden_meta(name: str) -> dict:
    with safe_open(str(GOLDEN / f"{name}.safetensors"), "pt") as f:
        return json.loads(f.metadata()["meta"])


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (tiny models: a second thread only adds overhead)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TrainWorker:
    """tests/train_worker.py (a tiny masked-data-modeling run of the one training loop, its settings as one JSON
    argument) run as a subprocess (``run``, optionally under torchrun) or in this process (``run_in_process``)."""

    script = Path(__file__).parent / "train_worker.py"
    repo = Path(__file__).resolve().parents[1]

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment without a launcher's rank variables, one thread, the repository importable."""
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(self.repo), **extra)
        return env

    def run(self, args: dict, nproc: int = 1, exit_at: int | None = None) -> subprocess.CompletedProcess:
        """The worker in a child process (``nproc`` > 1: that many gloo ranks); ``exit_at``: the run exits at that step."""
        if nproc == 1:
            cmd = [sys.executable, str(self.script), json.dumps(args)]
        else:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                   f"--master_port={port}", str(self.script), json.dumps(args)]
        env = self.env(**({"MULTIWAY_EXIT_AT_STEP": str(exit_at)} if exit_at else {}))
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    def run_in_process(self, args: dict) -> list[dict[str, float]]:
        """The worker's ``main`` in this process; the rows of its metrics.csv."""
        from multiway.train import read_metrics

        sys.path.insert(0, str(self.script.parent))
        import train_worker

        old = sys.argv
        sys.argv = [self.script.name, json.dumps(args)]
        try:
            train_worker.main()
        finally:
            sys.argv = old
        return read_metrics(args["out_dir"])

    @staticmethod
    def losses(rows: list[dict[str, float]]) -> list[tuple[int, float]]:
        """(step, loss) of the metrics rows that log a training loss."""
        return [(int(r["step"]), r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="session")
def worker() -> TrainWorker:
    """The training worker of the loop and fault tests (see :class:`TrainWorker`)."""
    return TrainWorker()


@pytest.fixture(scope="session")
def dense_shapes_data(tmp_path_factory):
    """The built-in scenes with their dense annotations (boxes, masks, segmentation maps, CoNLL), generated once
    per image size and test process: ``dense_shapes_data(64)`` -> the data folder."""
    from multiway.data.shapes import generate_synthetic_dataset
    from multiway.dense.builtin import write_dense_data

    made: dict[int, Path] = {}

    def folder(img_size: int) -> Path:
        if img_size not in made:
            out = generate_synthetic_dataset(tmp_path_factory.mktemp(f"shapes{img_size}"), num_images=30, num_pairs=10,
                                             imagenet_per_class=2, img_size=img_size, progress=False)
            made[img_size] = write_dense_data(out)
        return made[img_size]

    return folder
