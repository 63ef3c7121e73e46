"""Training memory: how a Multiway block keeps (or drops) its activations for backward.

Three policies, chosen per model by ``MultiwayConfig.grad_checkpointing`` and ``MultiwayConfig.recompute_norms``:

* ``"full"`` (``grad_checkpointing=True``): each block keeps only its input and reruns its whole forward in
  backward (one extra forward of every matmul, about +33% step FLOPs).
* ``"selective"`` (``recompute_norms=True``, the default): each block keeps its input and the outputs of its
  matmul-like ops (q/k/v/out projections, fc1, fc2, the attention kernel's output and log-sum-exp) and recomputes
  everything else in backward: the LayerNorms, the sub-LayerNorms, GELU, the per-modality joins and the head
  reshapes. Those ops are memory-bound and cheap to redo, but their outputs are most of a block's saved
  activations: fc1's output feeds GELU, whose output feeds the FFN sub-LN, whose output feeds fc2 (three
  ``ffn_dim``-wide tensors where one suffices), and every LayerNorm output is saved for the projection that
  reads it. Per block and token this keeps about ``11 D`` floats instead of ``21 D`` (``ffn_dim = 4 D``).
  No matmul runs twice, so the step's FLOPs do not change, and the recomputed ops are bit-identical to
  their first run, so outputs and gradients equal the ``"none"`` path exactly.
* ``"none"`` (``recompute_norms=False``): autograd keeps whatever each op saves.

The selective policy is :func:`torch.utils.checkpoint.create_selective_checkpoint_contexts` with a list of ops to
save; the per-modality segments of the residual stream are kept as they are (the block is called unchanged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RecomputePolicy = Literal["none", "selective", "full"]

_aten = torch.ops.aten
# Ops whose outputs the selective policy keeps: the matmuls and the attention kernels (every SDPA backend that
# PyTorch may dispatch to, CPU and CUDA). Everything else inside a block is recomputed in backward.
SAVED_OPS = frozenset(
    op
    for op in (
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten.convolution.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
    )
)


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context() -> tuple[Any, Any]:
    """The (forward, recompute) context pair for :func:`torch.utils.checkpoint.checkpoint`'s ``context_fn``."""
    return create_selective_checkpoint_contexts(_save_matmuls)


@contextlib.contextmanager
def _uncached_autocast() -> Iterator[None]:
    """Autocast without its weight-cast cache around a selectively checkpointed block.

    Within one autocast region the bf16 copy of a weight is made once and reused; a second call of the backbone in
    the same region (pretraining's streams, the retrieval model's two encoders) then skips the casts that the
    recomputation in backward performs, and the selective checkpoint refuses the differing op sequence. Without the
    cache every call casts its weights (a few hundred MB of bandwidth per step at base size) and both runs match.
    """
    with contextlib.ExitStack() as stack:
        for device in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device) and torch.is_autocast_cache_enabled():
                stack.enter_context(torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False))
        yield


def block_policy(grad_checkpointing: bool, recompute_norms: bool) -> RecomputePolicy:
    """The policy a model's config selects (full checkpointing wins over the selective one)."""
    if grad_checkpointing:
        return "full"
    return "selective" if recompute_norms else "none"


def run_block(block: nn.Module, policy: RecomputePolicy, *args: Any) -> Any:
    """Call ``block(*args)`` under ``policy``; without autograd (eval, ``no_grad``) the block simply runs."""
    if policy == "none" or not torch.is_grad_enabled():
        return block(*args)
    if policy == "full":
        return checkpoint(block, *args, use_reentrant=False)
    if policy == "selective":
        # determinism_check="none": the default compares every recomputed tensor's shape, dtype and device with
        # the forward's in Python (about 1% of a base CPU step). The selective context still fails loudly when the
        # recomputation asks for a saved op output that the forward did not record (a differing op sequence).
        with _uncached_autocast():
            return checkpoint(block, *args, use_reentrant=False, context_fn=selective_context, determinism_check="none")
    raise ValueError(f"recompute policy {policy!r}: expected one of 'none', 'selective', 'full'")

