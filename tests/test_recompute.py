"""Selective recomputation of the cheap ops (LayerNorms, sub-LN, GELU): same outputs and gradients, less memory."""

from __future__ import annotations

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

import multiway
from multiway.model.recompute import block_policy, run_block

TINY = "beit3_tiny_patch8_32"


def _inputs(batch: int = 3, text_len: int = 10):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, 32, 32, generator=g)
    ids = torch.randint(4, 60, (batch, text_len), generator=g)
    pad = torch.zeros(batch, text_len, dtype=torch.long)
    pad[1, -3:] = 1
    return image, ids, pad


def _pair(preset: str = TINY, **overrides):
    """Two models with the same weights: selective recomputation on and off."""
    overrides = {"drop_path_rate": 0.1, **overrides}
    torch.manual_seed(0)
    on = multiway.create_model(preset, recompute_norms=True, **overrides).train()
    off = multiway.create_model(preset, recompute_norms=False, **overrides).train()
    off.load_state_dict(on.state_dict())
    return on, off


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", [TINY, "beit3_tiny_patch8_32_paper"])
@pytest.mark.parametrize("mode", ["fused", "vision", "text"])
def test_outputs_and_gradients_equal_the_unrecomputed_path(preset, mode):
    image, ids, pad = _inputs()
    args = {"fused": (image, ids, pad), "vision": (image, None, None), "text": (None, ids, pad)}[mode]
    outs, grads = [], []
    on, off = _pair(preset)
    assert on.recompute_policy == "selective" and off.recompute_policy == "none"
    for model in (on, off):
        torch.manual_seed(1)  # same drop-path draws
        out = model(*args).last_hidden_state
        (out.square().mean() + out[:, 0].sum()).backward()
        outs.append(out.detach())
        grads.append(_grads(model))
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name  # bit for bit: the recomputed ops rerun exactly


def test_recomputation_halves_the_saved_activations():
    """Measured with PyTorch's MemTracker: the forward's activation peak falls by at least 40%."""
    image, ids, _ = _inputs(batch=8, text_len=16)
    peaks = []
    for model in _pair(TINY, drop_path_rate=0.0):
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            out = model(image, ids).last_hidden_state
            activation = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Activation"]
            out.square().mean().backward()
        peaks.append(activation)
    assert peaks[0] < 0.6 * peaks[1], peaks


def test_eval_and_no_grad_run_the_plain_path():
    on, _ = _pair()
    on.eval()
    assert on.recompute_policy == "none"
    on.train()
    with torch.no_grad():  # no checkpoint frames without autograd
        assert run_block(lambda x: x + 1, "selective", torch.zeros(2)).tolist() == [1.0, 1.0]


def test_full_checkpointing_wins_and_bad_policy_is_named():
    assert block_policy(grad_checkpointing=True, recompute_norms=True) == "full"
    assert block_policy(grad_checkpointing=False, recompute_norms=False) == "none"
    with pytest.raises(ValueError, match="'none', 'selective', 'full'"):
        run_block(lambda x: x, "some", torch.zeros(1, requires_grad=True))


def test_two_backbone_calls_in_one_bf16_autocast_region():
    """Pretraining's streams and the retrieval encoders call the backbone twice under one autocast: the weight-cast
    cache must not make the recomputation differ from the forward (the selective checkpoint would refuse it)."""
    image, ids, pad = _inputs()
    grads = []
    for model in _pair(drop_path_rate=0.0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(image, ids, pad).last_hidden_state.float().square().mean()
            loss = loss + model(text_ids=ids, text_padding_mask=pad).last_hidden_state.float().square().mean()
        loss.backward()
        grads.append(_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
