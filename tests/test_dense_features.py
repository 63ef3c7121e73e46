"""Dense features from the vision encoder: forward_intermediates, resized positions, window attention."""

from __future__ import annotations

import pytest
import torch

from multiway.model.config import get_config
from multiway.model.multiway import MultiwayTransformer, interpolate_vision_positions, window_partition, window_unpartition


def _model(**overrides) -> MultiwayTransformer:
    torch.manual_seed(0)
    return MultiwayTransformer(get_config("beit3_tiny_patch8_32", **overrides)).eval()


def _copy(src: MultiwayTransformer, **overrides) -> MultiwayTransformer:
    dst = MultiwayTransformer(src.config.replace(**overrides)).eval()
    dst.load_state_dict(src.state_dict())
    return dst


def test_native_size_equals_encode_image():
    model = _model()
    image = torch.randn(2, 3, 32, 32)
    reference = model.encode_image(image)
    tokens, maps = model.forward_intermediates(image, indices=[-1], norm=True)
    assert torch.equal(tokens, reference)
    assert maps[0].shape == (2, 64, 4, 4)
    assert torch.equal(maps[0].flatten(2).transpose(1, 2), reference[:, 1:])


def test_non_square_shapes_and_formats():
    model = _model()
    image = torch.randn(2, 3, 48, 24)
    tokens, maps = model.forward_intermediates(image, indices=2, return_prefix_tokens=True)
    assert tokens.shape == (2, 1 + 6 * 3, 64)
    assert [(m.shape, cls.shape) for m, cls in maps] == [((2, 64, 6, 3), (2, 1, 64))] * 2
    flat = model.forward_intermediates(image, indices=[0], output_fmt="NLC", intermediates_only=True)
    assert flat[0].shape == (2, 18, 64)
    # NCHW is the NLC sequence laid out row-major over the (h, w) grid.
    assert torch.equal(maps[0][0].flatten(2).transpose(1, 2), flat[0])


def test_resized_positions_match_the_checkpoint_interpolation_and_are_cached():
    model = _model()
    table = model.encoder.embed_positions["A"].weight
    with torch.no_grad():
        rows = model.vision_positions((6, 6))
        expected = interpolate_vision_positions(table, 36)[2:]
        assert torch.allclose(rows, expected, atol=1e-6)
        assert model.vision_positions((6, 6)) is rows  # cached
        table.add_(1.0)  # an optimizer step bumps the version: the cache must not serve the old table
        assert torch.allclose(model.vision_positions((6, 6)), rows + 1.0, atol=1e-5)
    # With gradients flowing into the table, the resize is in the graph.
    model.vision_positions((6, 3)).sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    model = _model()
    with pytest.raises(ValueError, match="divisible by patch_size=8"):
        model.forward_intermediates(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")
    with pytest.raises(ValueError, match="block index 5"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[5])


@pytest.mark.parametrize("window", [4, 6])  # 4 = the 4x4 grid exactly; 6 = one window with padding
def test_one_window_covering_the_image_is_global_attention(window):
    model = _model()
    image = torch.randn(2, 3, 32, 32)
    windowed = _copy(model, window_size=window)
    assert all(windowed.is_window_block(i) for i in range(2))
    torch.testing.assert_close(windowed.forward_intermediates(image)[0], model.encode_image(image), atol=1e-5, rtol=1e-5)


def test_windows_attend_only_within_themselves():
    model = _model(depth=1)
    windowed = _copy(model, window_size=2)
    image = torch.randn(1, 3, 32, 32)
    changed = image.clone()
    changed[:, :, 16:, 16:] += 1.0  # patches of the bottom-right window only
    before = windowed.forward_intermediates(image, intermediates_only=True)[0]
    after = windowed.forward_intermediates(changed, intermediates_only=True)[0]
    assert torch.equal(before[..., :2, :2], after[..., :2, :2])  # top-left window untouched
    assert not torch.equal(before[..., 2:, 2:], after[..., 2:, 2:])
    globally = model.forward_intermediates(image, intermediates_only=True)[0]
    assert not torch.allclose(globally, before)


def test_global_blocks_every_interval():
    model = _model(depth=4, window_size=2, global_attention_interval=2)
    assert [model.is_window_block(i) for i in range(4)] == [True, False, True, False]


def test_partition_round_trip_with_padding():
    tokens = torch.randn(2, 1 + 5 * 3, 8)
    windows, mask = window_partition(tokens, (5, 3), 2)
    assert windows.shape == (2 * 3 * 2, 1 + 4, 8) and mask.shape == (12, 1, 1, 5)
    assert int(mask.sum()) == 12 + 2 * 15  # every CLS copy plus each real patch once
    restored = window_unpartition(windows, 2, (5, 3), 2)
    assert torch.equal(restored[:, 1:], tokens[:, 1:])
    torch.testing.assert_close(restored[:, :1], tokens[:, :1])


def test_activation_checkpointing_gives_the_same_gradients():
    model = _model(window_size=3, drop_path_rate=0.0)
    checkpointed = _copy(model, window_size=3, grad_checkpointing=True)
    image = torch.randn(2, 3, 40, 24)
    for m in (model, checkpointed):
        m.train()
        tokens, maps = m.forward_intermediates(image, indices=[0, 1])
        (tokens.square().mean() + sum(x.mean() for x in maps)).backward()
    for (name, a), (_, b) in zip(model.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
