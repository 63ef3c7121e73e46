"""FSDP2 with the dual encoders' 0-dim ``logit_scale``: the project's FSDP path trains it on CPU gloo ranks.

``fully_shard`` refuses 0-dim parameters; :func:`multiway.train.distributed.wrap_model` keeps them replicated and
averages their gradients. Two ranks, each with half the batch, must produce the gradients, norm and update of one
process with the whole batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import multiway
from multiway.train import distributed as D

BATCH = 4
MODELS = {
    "retrieval": ("beit3_tiny_patch8_32_retrieval", {}),
    "contrastive pretraining": ("beit3_tiny_patch8_32_pretraining", {"contrastive": True}),
}


def _model(name: str) -> torch.nn.Module:
    preset, kwargs = MODELS[name]
    torch.manual_seed(0)
    return multiway.create_model(preset, drop_path_rate=0.0, **kwargs).train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(4, 60, (BATCH, 8), generator=g)


def _loss(name: str, model: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    if name == "retrieval":
        return model(image=image, text_description=text)[0]
    return model(image=image, text_ids=text, contrastive=True)[0]


def _step(name: str, model: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> dict:
    """One training step as the loop runs it: loss, backward, clipped gradient norm, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _loss(name, model, image, text).backward()
    scale_grad = model.logit_scale.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm=0.1)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2, as in the loop
    optimizer.step()
    return {"scale_grad": scale_grad, "norm": norm.detach(), "scale": model.logit_scale.detach().clone()}


def _rank(rank: int, world_size: int, port: int, name: str, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = D.wrap_model(_model(name), "fsdp", D.DistInfo(rank, world_size))
        assert D.is_fsdp(model) and not hasattr(model.logit_scale, "placements")  # replicated, not a DTensor
        image, text = _batch()
        rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        out = _step(name, model, image[rows], text[rows])
        state = D.full_model_state_dict(model)
        if rank == 0:
            out["state_shape"] = tuple(state["logit_scale"].shape)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", list(MODELS))
def test_fsdp2_trains_the_scalar_logit_scale_like_one_process(name):
    reference = _step(name, _model(name), *_batch())
    world_size = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(world_size, _free_port(), name, results), nprocs=world_size)
        results = dict(results)
    assert results[0]["state_shape"] == ()  # the official layout survives FSDP2
    for rank in range(world_size):
        got = results[rank]
        # the gathered contrastive loss of each half is averaged over the ranks: the whole batch's gradient
        torch.testing.assert_close(got["scale_grad"], reference["scale_grad"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["norm"], reference["norm"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["scale"], reference["scale"], rtol=1e-6, atol=1e-6)
    assert not torch.equal(results[0]["scale"], _model(name).logit_scale.detach())  # the step moved it
