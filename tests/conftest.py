import json
import os
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
