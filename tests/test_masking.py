import random

import numpy as np
import pytest
import torch

from multiway.data.masking import IGNORE_INDEX, BlockMaskingGenerator, mask_captioning, mask_text


def test_block_mask_exact_count_beit3():
    gen = BlockMaskingGenerator.from_ratio(14, 0.4)
    assert gen.num_masking_patches == 78
    rng = random.Random(0)
    for _ in range(50):
        m = gen(rng)
        assert m.shape == (14, 14) and m.dtype == torch.bool
        assert int(m.sum()) == 78
    assert gen(random.Random(0), flat=True).shape == (196,)


def test_block_mask_is_deterministic_and_blocky():
    gen = BlockMaskingGenerator(14, 75)
    a, b = gen(random.Random(7)), gen(random.Random(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, gen(random.Random(8)))
    # blocks, not scattered cells: most masked cells have a masked 4-neighbour
    m = a.int()
    pad = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neighbours = pad[:-2, 1:-1] + pad[2:, 1:-1] + pad[1:-1, :-2] + pad[1:-1, 2:]
    assert ((neighbours > 0) & a).sum() >= 0.9 * a.sum()


def test_block_mask_v1_can_fall_short_and_blocks_are_bounded():
    v1 = BlockMaskingGenerator(4, 15, min_num_patches=4, exact=False)
    v2 = BlockMaskingGenerator(4, 15, min_num_patches=4, exact=True)
    counts = [int(v1(random.Random(s)).sum()) for s in range(20)]
    assert min(counts) < 15 and max(counts) <= 15  # v1 can stop short, never overshoots
    assert all(int(v2(random.Random(s)).sum()) == 15 for s in range(20))  # v2 tops up
    # a 16-patch block would need a side >= 4, but blocks must be strictly narrower than the 4x4 grid
    none = BlockMaskingGenerator(4, 16, min_num_patches=16, exact=False)
    assert int(none(random.Random(0)).sum()) == 0
    with pytest.raises(ValueError):
        BlockMaskingGenerator(4, 17)


def test_mask_text_never_masks_specials_or_padding():
    ids = torch.tensor([[0, 10, 11, 12, 13, 14, 15, 16, 17, 2, 1, 1],
                        [0, 20, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    pad = (ids == 1).long()
    special = (0, 1, 2, 99)
    rng = np.random.default_rng(0)
    out, chosen, labels = mask_text(ids, pad, 0.5, special, mask_id=99, vocab_size=99, rng=rng)
    assert chosen[0].sum() == 4  # round(0.5 * 8)
    assert chosen[1].sum() == 1  # at least one
    assert not chosen[ids == 0].any() and not chosen[ids == 2].any() and not chosen[pad.bool()].any()
    assert (out[chosen] == 99).all() and torch.equal(out[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen]) and (labels[~chosen] == IGNORE_INDEX).all()
    # 1-D input, and a row with nothing maskable stays untouched
    o1, c1, _ = mask_text(torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1]), 0.5, special, 99, 99, rng)
    assert not c1.any() and torch.equal(o1, torch.tensor([0, 2, 1]))


def test_mask_text_replacement_split_and_determinism():
    ids = torch.arange(4, 4004)[None]
    pad = torch.zeros_like(ids)
    out, chosen, _ = mask_text(ids, pad, 0.5, (0, 1, 2, 5000), 5000, 5000, np.random.default_rng(1),
                               replace_probs=(0.8, 0.1, 0.1))
    n = int(chosen.sum())
    assert n == 2000
    masked = (out[chosen] == 5000).float().mean()
    kept = (out[chosen] == ids[chosen]).float().mean()
    assert 0.75 < masked < 0.85 and 0.07 < kept < 0.14
    assert out.max() <= 5000 and out[chosen & (out != 5000)].min() >= 4
    again = mask_text(ids, pad, 0.5, (0, 1, 2, 5000), 5000, 5000, np.random.default_rng(1),
                      replace_probs=(0.8, 0.1, 0.1))
    assert torch.equal(again[0], out)
    with pytest.raises(ValueError):
        mask_text(ids, pad, 0.5, (0,), 5000, 5000, np.random.default_rng(1), replace_probs=(0.5, 0.1, 0.1))


def test_mask_captioning_official_rule():
    tokens = [0, 10, 11, 12, 13, 2, 1, 1]
    n = 6
    rng = random.Random(0)
    for p, expect in ((0.6, 4), (0.0, 1), (1.0, 5)):
        masked, pos = mask_captioning(tokens, n, p, mask_id=50, vocab_size=51, rng=rng)
        assert sum(pos) == expect  # max(1, min(int(n*p+0.5), n-1))
        assert pos[0] == 0 and sum(pos[n:]) == 0  # <s> and padding never
        assert len(masked) == len(tokens) == len(pos)
        assert all(3 <= t <= 50 or t == o for t, o, m in zip(masked, tokens, pos) if m)
    counts = {"mask": 0, "same": 0, "other": 0}
    long = [0] + list(range(4, 1004)) + [2]
    for s in range(5):
        masked, pos = mask_captioning(long, len(long), 0.5, 2000, 2001, random.Random(s))
        for t, o, m in zip(masked, long, pos):
            if m:
                counts["mask" if t == 2000 else "same" if t == o else "other"] += 1
    total = sum(counts.values())
    assert 0.77 < counts["mask"] / total < 0.83 and 0.08 < counts["same"] / total < 0.12
