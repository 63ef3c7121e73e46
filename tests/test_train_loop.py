"""The one training loop: distributed equivalence (gloo, 2 processes), kill-and-resume exactness, NaN guard,
checkpoint rotation and the official-layout export. All on the tiny preset, a few steps each."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import multiway
from multiway.train import MapDatasetTask, NonFiniteLossError, TrainConfig, checkpoint_dirs, mdm_loss, read_metrics, train

sys.path.insert(0, str(Path(__file__).parent))
import train_worker  # noqa: E402


def assert_same_losses(a, b, atol=1e-5):
    la, lb = ([(int(r["step"]), r["loss"]) for r in rows if "loss" in r] for rows in (a, b))
    assert [s for s, _ in la] == [s for s, _ in lb], (la, lb)
    for (s, x), (_, y) in zip(la, lb):
        assert abs(x - y) <= atol * max(1.0, abs(x)), f"step {s}: {x} vs {y}"


COMMON = {"max_steps": 6, "save_every": 2, "accum_steps": 2, "grad_clip": 1.0}


@pytest.fixture(scope="module")
def baseline(worker, tmp_path_factory) -> list[dict[str, float]]:
    """1 process, batch 8, uninterrupted."""
    out = tmp_path_factory.mktemp("base")
    return worker.run_in_process({**COMMON, "out_dir": str(out), "batch_size": 8})


def test_two_ranks_ddp_match_one_rank_double_batch(worker, baseline, tmp_path):
    proc = worker.run({**COMMON, "out_dir": str(tmp_path), "batch_size": 4}, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(baseline, read_metrics(tmp_path))


def test_contrastive_loss_over_two_ranks_matches_one_rank_double_batch(worker, tmp_path):
    """Negatives gathered from both ranks (all_gather with gradients) + DDP averaging = the one-rank batch."""
    args = {**COMMON, "max_steps": 4, "itc": True}
    one = worker.run_in_process({**args, "out_dir": str(tmp_path / "one"), "batch_size": 8})
    proc = worker.run({**args, "out_dir": str(tmp_path / "two"), "batch_size": 4}, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(one, read_metrics(tmp_path / "two"))
    mdm_only = worker.run_in_process({**args, "itc": False, "out_dir": str(tmp_path / "mdm"), "batch_size": 8})
    assert worker.losses(mdm_only)[0][1] < worker.losses(one)[0][1] - 1.0  # the contrastive term is in the loss (~2 x log 8)


def test_fsdp_two_ranks_killed_and_resumed_matches(worker, baseline, tmp_path):
    """FSDP2 over 2 gloo ranks, both processes killed (os._exit, no cleanup) after step 5 (last checkpoint at 4,
    sharded with torch.distributed.checkpoint), then a new torchrun resumes: the loss sequence equals
    1 rank x double batch, uninterrupted."""
    args = {**COMMON, "out_dir": str(tmp_path), "batch_size": 4, "strategy": "fsdp"}
    killed = worker.run(args, nproc=2, exit_at=5)
    assert killed.returncode != 0, "the run was not killed"
    resumed = worker.run(args, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr  # the multiway logger writes to stderr
    assert "resumed from" in log and "step_00000004" in log
    assert (tmp_path / "checkpoints/step_00000004/sharded/.metadata").is_file()
    assert_same_losses(baseline, read_metrics(tmp_path))


def test_kill_and_resume_is_exact_with_drop_path(worker, tmp_path):
    """A process killed mid-run (os._exit after step 5, like SIGKILL) and resumed gives the same losses,
    bit for bit, as an uninterrupted run — drop path on, so the restored RNG state matters."""
    args = {**COMMON, "batch_size": 4, "drop_path": 0.5}
    full = worker.run_in_process({**args, "out_dir": str(tmp_path / "full")})
    killed = worker.run({**args, "out_dir": str(tmp_path / "cut")}, exit_at=5)
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert len(worker.losses(read_metrics(tmp_path / "cut"))) == 5
    resumed = worker.run({**args, "out_dir": str(tmp_path / "cut")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_metrics(tmp_path / "cut")
    assert worker.losses(rows) == worker.losses(full)  # exact, and step 5 (logged before the kill) is not duplicated


def test_checkpoints_keep_last_and_export_loads_into_vqa(worker, tmp_path):
    worker.run_in_process({"out_dir": str(tmp_path), "max_steps": 4, "save_every": 1, "keep_last": 2, "batch_size": 4})
    dirs = checkpoint_dirs(tmp_path)
    assert [p.name for p in dirs] == ["step_00000003", "step_00000004"]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))
    export = dirs[-1] / "model.safetensors"
    vqa = multiway.create_model("beit3_tiny_patch8_32_vqav2", num_classes=10)
    report = multiway.load_checkpoint(vqa, export)  # strict: raises on any backbone mismatch
    assert not [k for k in report.missing if k.startswith("beit3.")]
    state = torch.load(dirs[-1] / "state.pt", weights_only=False)["model"]
    torch.testing.assert_close(vqa.beit3.text_embed.weight, state["beit3.text_embed.weight"])
    # the export alone rebuilds the pretraining model
    again = multiway.create_model(str(export))
    assert type(again).__name__ == "BEiT3ForPretraining"
    assert (tmp_path / "tb").is_dir() and (tmp_path / "train_config.yaml").is_file()


def test_nan_loss_skips_update_then_stops(worker, tmp_path):
    torch.manual_seed(0)
    model = multiway.create_model("beit3_tiny_patch8_32_pretraining", codebook_size=train_worker.CODEBOOK)
    calls = {"n": 0}
    snapshots = []

    def loss_fn(m, batch):
        calls["n"] += 1
        snapshots.append(m.mlm_head.weight.detach().clone())
        loss, logs = mdm_loss(m, batch)
        if calls["n"] in (2, 4, 5, 6):  # step 2 is bad alone; steps 4, 5, 6 are bad in a row
            loss = loss + float("inf") if calls["n"] == 4 else loss * float("nan")
        return loss, logs

    task = MapDatasetTask(train_worker.SyntheticMDM(), train_worker.collate, 4, loss_fn)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=20, max_bad_steps=3, log_every=1, progress=False, save_every=0)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(model, task, cfg)
    assert calls["n"] == 6
    # step 2 was skipped: the weights seen by step 3 equal those seen by step 2; step 3 did update them
    assert torch.equal(snapshots[1], snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[3])
    assert torch.isfinite(model.mlm_head.weight).all()
    rows = read_metrics(tmp_path)
    assert rows[-1]["bad_steps"] == 4
    assert [int(r["step"]) for r in rows if "loss" in r] == [1, 3]  # skipped steps log no loss
    assert [r["bad_steps"] for r in rows if int(r["step"]) in (1, 2, 3)] == [0, 1, 1]


def test_map_dataset_task_rank_split_and_resume():
    ds = list(range(40))
    task = MapDatasetTask(ds, lambda items: torch.tensor(items), 4, lambda m, b: (torch.zeros(()), {}))
    one = task.train_batches(0, 1, seed=3, start_step=0)
    r0 = task.train_batches(0, 2, seed=3, start_step=0)
    r1 = task.train_batches(1, 2, seed=3, start_step=0)
    big = MapDatasetTask(ds, lambda items: torch.tensor(items), 8, None).train_batches(0, 1, seed=3, start_step=0)
    for _ in range(7):  # crosses an epoch boundary (5 global batches per epoch)
        assert next(big).tolist() == next(r0).tolist() + next(r1).tolist()
    # resume mid-stream: start_step = micro-batches consumed
    seq = [next(one).tolist() for _ in range(13)]
    resumed = task.train_batches(0, 1, seed=3, start_step=9)
    assert [next(resumed).tolist() for _ in range(4)] == seq[9:]
    # epochs differ, and every epoch covers the data once
    assert sorted(sum(seq[:10], [])) == sorted(ds)
    assert seq[10:13] != seq[0:3]
