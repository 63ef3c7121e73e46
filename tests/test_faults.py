"""Faults during training, on CPU with the tiny model: a SIGKILL halfway through writing a checkpoint, a corrupt or
truncated newest checkpoint, a full disk during a save, a dataloader worker that raises, dies or stalls, a NaN batch.

Each test states what the user must see: the run resumes and repeats the uninterrupted losses exactly, a warning or
error names the folder or the sample, and nothing that looks complete is left half-written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_worker  # noqa: E402

import multiway  # noqa: E402
from multiway.train import (  # noqa: E402
    CheckpointSaveError,
    MapDatasetTask,
    SampleLoadError,
    TrainConfig,
    checkpoint_dirs,
    mdm_loss,
    read_metrics,
    train,
)

ARGS = {"max_steps": 8, "save_every": 2, "keep_last": 4, "batch_size": 4}


def step_names(out: Path) -> list[str]:
    return [p.name for p in checkpoint_dirs(out)]


def test_sigkill_while_writing_a_checkpoint_resumes_exactly(worker, tmp_path):
    base = worker.run({**ARGS, "save_every": 3, "out_dir": str(tmp_path / "base")})
    assert base.returncode == 0, base.stderr
    out = tmp_path / "cut"
    args = {**ARGS, "save_every": 3, "out_dir": str(out)}
    killed = worker.run({**args, "kill_in_save_at": 6})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert step_names(out) == ["step_00000003"]  # the half-written step 6 does not look complete
    partial = out / "checkpoints" / ".tmp_step_00000006"
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    resumed = worker.run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr and "step_00000003" in resumed.stdout + resumed.stderr
    assert ".tmp_step_00000006" in resumed.stderr  # the leftover is named and removed
    assert not partial.exists()
    assert worker.losses(read_metrics(out)) == worker.losses(read_metrics(tmp_path / "base"))  # exactly, digit for digit


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, inside the tensor data: unpickling alone may not notice
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_byte], ids=["truncated", "flipped_byte"])
def test_corrupt_newest_checkpoint_falls_back_to_previous(worker, tmp_path, damage, caplog):
    out = tmp_path / "run"
    args = {**ARGS, "out_dir": str(out)}
    first = worker.losses(worker.run_in_process(args))
    assert step_names(out)[-2:] == ["step_00000006", "step_00000008"]
    damage(out / "checkpoints" / "step_00000008" / "state.pt")
    with caplog.at_level(logging.WARNING, logger="multiway"):
        again = worker.losses(worker.run_in_process(args))
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "step_00000008" in warning and "falling back" in warning
    assert again == first  # resumed at step 6 and repeated steps 7-8 exactly


def test_full_disk_during_save_leaves_previous_intact(worker, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def save_on_full_disk(obj, f, *args, **kwargs):
        if ".tmp_step_00000004" in str(f):
            with open(f, "wb") as fh:  # some bytes reach the disk before it fills up
                fh.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_full_disk)
    with pytest.raises(CheckpointSaveError, match=r"step 4 .*No space left on device.*disk is full.*step_00000002 is intact"):
        worker.run_in_process({**ARGS, "out_dir": str(out)})
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # no half-written folder
    previous = out / "checkpoints" / "step_00000002"
    assert (previous / "manifest.json").is_file()
    resumed = worker.run_in_process({**ARGS, "out_dir": str(out)})  # the previous checkpoint still loads
    assert [s for s, _ in worker.losses(resumed)] == list(range(1, 9))


class FailingItems(train_worker.SyntheticMDM):
    """The synthetic data, except that loading sample ``bad`` raises, kills its worker, or stalls."""

    def __init__(self, bad: int, how: str):
        super().__init__()
        self.bad, self.how = bad, how

    def __getitem__(self, i: int) -> dict:
        if i == self.bad:
            if self.how == "raise":
                raise ValueError("corrupt record")
            if self.how == "exit":
                os._exit(3)
            time.sleep(120)
        return super().__getitem__(i)


@pytest.fixture
def alarm():
    """Fail a test that hangs instead of hanging the suite."""

    def _hung(signum, frame):
        raise TimeoutError("the test hung")

    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(90)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("how", "workers"), [("raise", 0), ("raise", 1), ("exit", 1), ("stall", 1)])
def test_dataloader_failure_names_the_sample(worker, tmp_path, how, workers, alarm):
    probe = MapDatasetTask(train_worker.SyntheticMDM(), train_worker.collate, 4, mdm_loss)
    bad, _ = probe.epoch_batches(0, 0, 1, seed=0)[2][1]  # (index, seed) of a sample of the third batch: two steps train first
    task = MapDatasetTask(FailingItems(bad, how), train_worker.collate, 4, mdm_loss, num_workers=workers,
                          worker_timeout=5.0 if how == "stall" else 0.0)
    torch.manual_seed(0)
    model = multiway.create_model("beit3_tiny_patch8_32_pretraining", codebook_size=train_worker.CODEBOOK)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=6, save_every=1000, log_every=1, progress=False)
    start = time.monotonic()
    with pytest.raises(SampleLoadError, match=rf"sample\(?s?\)? \[?{bad}\b") as info:
        train(model, task, cfg)
    assert "FailingItems" in str(info.value)
    assert time.monotonic() - start < 60


def test_nan_batch_is_skipped_and_counted(worker, tmp_path):
    probe = MapDatasetTask(train_worker.SyntheticMDM(), train_worker.collate, 4, mdm_loss)
    poisoned, _ = probe.epoch_batches(0, 0, 1, seed=0)[2][0]  # the first sample of step 3's batch
    out = tmp_path / "run"
    rows = worker.run_in_process({**ARGS, "out_dir": str(out), "log_every": 1, "nan_at": [poisoned]})
    by_step = {int(r["step"]): r for r in rows if "bad_steps" in r}
    assert sorted(by_step) == list(range(1, 9))  # every step is logged, the skipped one too
    assert [by_step[s]["bad_steps"] for s in (2, 3, 4, 8)] == [0, 1, 1, 1]
    assert "loss" not in by_step[3] and all("loss" in by_step[s] for s in (2, 4))
    state = torch.load(out / "checkpoints" / "step_00000008" / "state.pt", weights_only=False)
    assert state["meta"]["step"] == 8 and state["meta"]["bad_total"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_manifest_lists_every_file_with_its_hash(worker, tmp_path):
    from multiway.train.checkpointing import verify_checkpoint

    out = tmp_path / "run"
    worker.run_in_process({**ARGS, "max_steps": 2, "out_dir": str(out)})
    folder = checkpoint_dirs(out)[-1]
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert {"state.pt", "rng_rank0.pt", "model.safetensors"} <= set(manifest)
    verify_checkpoint(folder)
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(RuntimeError, match=r"model.safetensors: \d+ bytes, the manifest says"):
        verify_checkpoint(folder)


class _RunsCode:
    """Unpickling this calls a function: what a hostile checkpoint file would do (here a harmless one)."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_file_that_would_run_code_is_refused(worker, tmp_path, caplog):
    out = tmp_path / "run"
    args = {**ARGS, "out_dir": str(out)}
    first = worker.losses(worker.run_in_process(args))
    newest = out / "checkpoints" / "step_00000008"
    state = torch.load(newest / "state.pt", weights_only=False)
    state["meta"]["payload"] = _RunsCode()
    torch.save(state, newest / "state.pt")
    (newest / "manifest.json").unlink()  # as if written by hand: nothing to verify against
    with caplog.at_level(logging.WARNING, logger="multiway"):
        again = worker.losses(worker.run_in_process(args))
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "step_00000008" in warning and "Weights only load failed" in warning
    assert again == first  # resumed from step 6 instead
