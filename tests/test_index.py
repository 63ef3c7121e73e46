"""The image index: build with broken images skipped, incremental add by (path, mtime, size), a killed build that
resumes without losing finished work, a 2-rank build under torchrun (gloo, CPU), IVF-PQ, search on the CLI."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("faiss")

from serving_data import make_serving_data  # noqa: E402

from multiway.cli import main as cli_main  # noqa: E402
from multiway.downstream import predict as P  # noqa: E402
from multiway.index import ImageIndex, IndexConfig, IndexStateError, build_faiss, build_index  # noqa: E402
from multiway.index.store import META_FILE  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_serving_data(tmp_path_factory.mktemp("index"))


def _collection(data, root, copies: int = 1):
    """A folder with the 8 colour squares (``copies`` times each, under other names) and one broken file."""
    root.mkdir(parents=True, exist_ok=True)
    for src in sorted(data.images.glob("*.png")):
        for k in range(copies):
            shutil.copy(src, root / f"{src.stem}_{k}.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    return root


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_build_skips_broken_then_add_embeds_only_new_and_changed(data, tmp_path):
    photos = _collection(data, tmp_path / "photos")
    cfg = IndexConfig(model=str(data.retrieval), batch_size=3, progress=False)
    report = build_index([photos], tmp_path / "idx", cfg)
    assert (report.total, report.embedded, report.vectors, report.kind) == (9, 8, 8, "flat")
    assert len(report.errors) == 1 and "broken.png" in report.errors[0]
    index = ImageIndex.open(tmp_path / "idx")
    pred = P.load_predictor(data.retrieval, device="cpu")
    want, paths, _ = P.embed_images(pred, sorted(photos.glob("*_0.png")))
    hits = index.search(want[:2], k=3)
    assert [h[0].path for h in hits] == paths[:2] and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert index.errors()[0][0].endswith("broken.png")

    # change one file, add one, delete one; the broken file is unchanged and not retried
    (photos / "red_0_0.png").write_bytes((photos / "blue_0_0.png").read_bytes())
    shutil.copy(photos / "green_1_0.png", photos / "new.png")
    (photos / "yellow_1_0.png").unlink()
    report = build_index([photos], tmp_path / "idx", cfg)
    assert (report.embedded, report.unchanged, report.removed, report.vectors, report.errors) == (2, 7, 1, 8, [])
    index = ImageIndex.open(tmp_path / "idx")
    blue = index.search(want[paths.index(str(photos / "blue_0_0.png"))][None], k=2)[0]
    assert {h.path for h in blue} == {str(photos / "blue_0_0.png"), str(photos / "red_0_0.png")}  # red_0 is blue now


def test_killed_build_resumes_without_losing_finished_batches(data, tmp_path):
    photos = _collection(data, tmp_path / "photos", copies=40)  # 320 images + 1 broken
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "multiway.cli", "index", "build", str(photos), "--model", str(data.retrieval), "--out", str(out),
           "batch_size=1", "progress=false"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done, deadline = 0, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / META_FILE).is_file():
            try:
                with sqlite3.connect(out / META_FILE, timeout=5) as conn:
                    done = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            except sqlite3.OperationalError:  # the schema is being created
                done = 0
            if done >= 10:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    with sqlite3.connect(out / META_FILE) as conn:
        kept = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    assert 10 <= kept < 321
    with pytest.raises(IndexStateError, match="index add"):
        ImageIndex.open(out)  # searching a half-built index says how to finish it
    report = build_index([photos], out, IndexConfig(batch_size=16, progress=False))  # the model comes from the index
    assert report.unchanged == kept and report.embedded + len(report.errors) == 321 - kept and report.vectors == 320
    assert len(ImageIndex.open(out)) == 320


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_build_under_torchrun_equals_one_process(data, tmp_path):
    photos = _collection(data, tmp_path / "photos")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "multiway.cli", "index", "build", str(photos), "--model", str(data.retrieval),
           "--out", str(tmp_path / "ddp"), "--json", "batch_size=2", "progress=false"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    assert report["per_rank"] == [4, 4] and report["vectors"] == 8 and len(report["errors"]) == 1
    assert not list((tmp_path / "ddp" / "shards").glob("*.sqlite"))  # merged by rank 0
    single = build_index([photos], tmp_path / "one", IndexConfig(model=str(data.retrieval), progress=False))
    assert single.vectors == 8
    a, b = ImageIndex.open(tmp_path / "ddp"), ImageIndex.open(tmp_path / "one")
    queries = np.random.default_rng(0).standard_normal((4, a.dim)).astype(np.float32)
    ra, rb = a.search(queries, k=8), b.search(queries, k=8)
    assert [[h.path for h in r] for r in ra] == [[h.path for h in r] for r in rb]
    np.testing.assert_allclose([[h.score for h in r] for r in ra], [[h.score for h in r] for r in rb], atol=1e-5)


def test_ivfpq_on_request_and_by_threshold(data, tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(3000) * 7 + 5  # the index returns the ids it was given, not positions
    index = build_faiss(ids, vectors, kind="ivfpq")
    assert "IVF" in type(index).__name__ and index.ntotal == 3000
    _, found = index.search(vectors[:100], 10)
    self_recall = np.mean([ids[i] in found[i] for i in range(100)])
    assert self_recall > 0.8  # approximate, but each vector finds itself among its 10 nearest
    assert set(found.ravel()) <= set(ids)
    photos = _collection(data, tmp_path / "photos")
    with pytest.raises(IndexStateError, match="at least 256 vectors"):  # the threshold switched to IVF-PQ, too few to train
        build_index([photos], tmp_path / "idx", IndexConfig(model=str(data.retrieval), ivfpq_threshold=4, progress=False))


def test_cli_build_and_search_json(data, tmp_path, capsys):
    photos = _collection(data, tmp_path / "photos")
    assert cli_main(["index", "build", str(photos), "--model", str(data.retrieval), "--out", str(tmp_path / "idx"), "progress=false"]) == 0
    assert "8 vectors (flat)" in capsys.readouterr().out
    assert cli_main(["index", "add", str(tmp_path / "idx"), "progress=false"]) == 0
    assert "embedded 0, 9 unchanged" in capsys.readouterr().out
    assert cli_main(["index", "search", str(tmp_path / "idx"), "--query", "a red square", "--topk", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 3 and result["hits"][0]["score"] >= result["hits"][1]["score"]
    assert all(h["path"].startswith(str(photos)) for h in result["hits"])
