"""METER objectives, optimisation, bf16 safety, and the study grid on the built-in data."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from multiway.data.masking import IGNORE_INDEX
from multiway.meter.config import OptimConfig, tiny_config
from multiway.meter.model import METERForPretraining
from multiway.meter.objectives import (
    TextSpec,
    mask_pixels,
    mim_mask,
    patch_pixel_targets,
    pretraining_loss,
    sample_negative_images,
    span_corrupt,
    whole_word_mask,
)
from multiway.meter.optim import meter_param_groups, train_config
from multiway.train import linear_lr, train

V = 60


# Tiny METER models run fastest on one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _spec() -> TextSpec:
    starts = torch.zeros(V, dtype=torch.bool)
    starts[::3] = True  # every third id starts a word
    starts[:4] = True
    return TextSpec(V, 1, 0, 2, V - 1, (0, 1, 2, V - 1), starts)


def _text(B=4, T=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V - 1, (B, T), generator=g)
    ids[:, 0] = 0
    pad = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = 8 + 2 * b if 8 + 2 * b < T else T - 1
        ids[b, n] = 2
        ids[b, n + 1 :] = 1
        pad[b, n + 1 :] = 1
    return ids, pad


def test_whole_word_masking_masks_whole_words():
    spec = _spec()
    ids, pad = _text()
    _, labels = whole_word_mask(ids, pad, spec, 0.3, np.random.default_rng(0))
    assert (labels != IGNORE_INDEX).any()
    for b in range(ids.shape[0]):
        body = [t for t in range(ids.shape[1]) if pad[b, t] == 0 and int(ids[b, t]) not in spec.special_ids]
        for t in body:  # a continuation token is predicted iff the token before it (same word) is
            if not spec.word_start[ids[b, t]] and t - 1 in body:
                assert (labels[b, t] != IGNORE_INDEX) == (labels[b, t - 1] != IGNORE_INDEX)


def test_span_corruption_reconstructs_the_text():
    spec = _spec()
    ids, pad = _text()
    start, n_sent = V, 8
    enc, enc_pad, dec_in, dec_lab = span_corrupt(ids, pad, spec, start, n_sent, 0.3, 2.0, 24, np.random.default_rng(0))
    for b in range(ids.shape[0]):
        e = enc[b][enc_pad[b] == 0].tolist()
        tgt = [t for t in dec_lab[b].tolist() if t != IGNORE_INDEX]
        assert tgt[-1] == spec.eos_id and any(t >= start for t in e)
        spans, cur = {}, None
        for t in tgt[:-1]:
            if t >= start:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in e for x in (spans[t] if t >= start else [t])]
        assert rebuilt == ids[b][pad[b] == 0].tolist()
        assert dec_in[b, 0] == spec.bos_id and dec_in[b, 1 : len(tgt)].tolist() == tgt[:-1]


def test_itm_negatives():
    torch.manual_seed(0)
    neg = sample_negative_images(None, 6, torch.device("cpu"))
    assert (neg != torch.arange(6)).all()
    sim = torch.full((4, 4), -50.0)
    sim[0, 2] = sim[1, 3] = sim[2, 0] = sim[3, 1] = 50.0  # the hardest negative dominates
    assert sample_negative_images(sim, 4, torch.device("cpu")).tolist() == [2, 3, 0, 1]


def test_mim_masks_and_targets():
    m = mim_mask(3, 4, 0.4, random.Random(0))
    assert m.shape == (3, 16) and (m.sum(1) == round(0.4 * 16)).all()
    img = torch.randn(3, 3, 32, 32)
    masked = mask_pixels(img, m, 4)
    cells = masked.reshape(3, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(3, 16, -1)
    assert (cells[m] == 0).all() and (cells[~m] != 0).any()
    t = patch_pixel_targets(img, 4)
    assert t.shape == (3, 16, 192)
    torch.testing.assert_close(t.mean(-1), torch.zeros(3, 16), atol=1e-4, rtol=0)


def test_param_groups_and_schedule():
    model = METERForPretraining(tiny_config("vit", "bert"))
    optim = OptimConfig(lr=1e-5, lr_mult_top=5, lr_mult_head=50)
    groups = meter_param_groups(model, optim)
    by_level = {}
    for g in groups:
        by_level.setdefault(g["level"], set()).update(g["names"])
        assert g["lr_scale"] == {"bottom": 1, "top": 5, "head": 50}[g["level"]]
        assert all(not n.endswith(".bias") for n in g["names"]) or g["weight_decay"] == 0
    assert all(n.startswith(("meter.vision.", "meter.text.")) for n in by_level["bottom"])
    assert "meter.fusion.text_layers.0.self_attn.q.weight" in by_level["top"]
    assert "itm_head.weight" in by_level["head"]
    assert len(set().union(*by_level.values())) == sum(1 for _ in model.parameters())
    assert model.optim_groups() == meter_param_groups(model, model.config.optim)  # what the shared loop uses
    lrs = [linear_lr(s, 1.0, 0.0, 10, 100) for s in range(101)]
    assert lrs[1] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert lrs[100] == 0.0 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


class _RandomPairs:
    """A TrainTask of random image-text pairs (only the shapes matter here)."""

    def __init__(self, B=4, T=12):
        self.B, self.T = B, T

    def train_batches(self, rank, world_size, seed, start_step):
        g = torch.Generator().manual_seed(seed)
        while True:
            ids, pad = _text(self.B, self.T)
            yield {"image": torch.randn(self.B, 3, 32, 32, generator=g), "language_tokens": ids, "padding_mask": pad}


@pytest.mark.parametrize("fusion,arch", [("co_attention", "encoder_only"), ("merged_attention", "encoder_decoder")])
def test_bf16_training_stays_finite(fusion, arch, tmp_path):
    """A few steps under CPU bf16 autocast with every objective on, at a deliberately high lr."""
    cfg = tiny_config("vit", "bert", fusion, arch, mim=True, itm_hard_negatives=True, whole_word_masking=True)
    cfg.text.vocab_size = V
    cfg.optim = OptimConfig(lr=1e-3, lr_mult_head=10)
    model = METERForPretraining(cfg)
    spec = _spec()

    class Task(_RandomPairs):
        def loss(self, model, batch):
            return pretraining_loss(model, batch, spec, cfg.objectives)

    res = train(model, Task(), train_config(cfg.optim, 4, str(tmp_path), precision="bf16"))
    assert res["bad_steps"] == 0
    for k in ("loss", "mlm/loss", "itm/loss", "mim/loss", "itc/loss"):
        assert math.isfinite(res[k]), k
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        batch = next(Task().train_batches(0, 1, 1, 0))
        out = model.meter.encode(batch["image"], batch["language_tokens"], batch["padding_mask"])
        proj = model.meter.text_proj(torch.randn(2, 32))
    assert proj.dtype == torch.bfloat16  # matmuls ran in bf16 ...
    assert torch.isfinite(out.text.float()).all() and torch.isfinite(out.image.float()).all()  # ... and stayed finite


# --- the grid on the built-in data ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    from multiway.data.shapes import generate_synthetic_dataset

    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("builtin"), num_images=80, img_size=32, num_pairs=60, imagenet_per_class=4, progress=False
    )


# Every value of every axis, and the full fusion x architecture product, in six cells.
CELLS = [
    ("co_attention", "encoder_only", "mlm+itm+mim", "vit+bert_pretrained"),
    ("merged_attention", "encoder_only", "wwm+itm_hard", "swin+roberta"),
    ("co_attention", "encoder_decoder", "mlm+itm+mim_vqkd", "multiway+embedding"),
    ("merged_attention", "encoder_decoder", "mlm", "vit+bert"),
    ("co_attention", "encoder_decoder", "itm", "swin+bert_pretrained"),
    ("merged_attention", "encoder_only", "mlm+itm", "multiway+bert_pretrained"),
]


def test_every_cell_trains_and_evaluates(builtin, tmp_path):
    from multiway.meter.study import ENCODERS, OBJECTIVES, TASKS, StudyConfig, cell_config, load_study_data, pretrain_text_encoder, run_cell

    covered = {i: {c[i] for c in CELLS} for i in range(4)}
    assert covered[0] == {"co_attention", "merged_attention"} and covered[1] == {"encoder_only", "encoder_decoder"}
    assert {e[0] for e in (ENCODERS[c] for c in covered[3])} == {"vit", "swin", "multiway"}
    assert {e[1] for e in (ENCODERS[c] for c in covered[3])} == {"bert", "roberta", "embedding"}
    assert covered[2] >= {"mlm+itm+mim", "wwm+itm_hard", "mlm+itm+mim_vqkd"} and covered[2] <= set(OBJECTIVES)

    cfg = StudyConfig(data_dir=str(builtin), out_dir=str(tmp_path), pretrain_steps=2, finetune_steps=1, text_pretrain_steps=2,
                      batch_size=8, max_eval_items=16, tasks=list(TASKS), task_steps={"nlvr2": 2})
    data = load_study_data(cfg)
    text_dir = pretrain_text_encoder(tmp_path / "bert", data, "bert", 2, 8, 0)
    for fusion, arch, obj, enc in CELLS:
        mc = cell_config(cfg, fusion, arch, obj, enc, data, text_dir)
        row = run_cell(cfg, mc, data)
        keys = ["vqa_score", "vqa_score_blind", "nlvr2_acc", "nlvr2_acc_blind", "ir_r@1", "tr_r@1", "ret_avg", "params_M", "samples_per_s"]
        keys += ["cider", "bleu4"] if arch == "encoder_decoder" else []
        for k in keys:
            assert k in row and math.isfinite(row[k]), (fusion, arch, obj, enc, k)
        assert row["bad_steps"] == 0
        assert ("cider" in row) == (arch == "encoder_decoder")


def test_study_cli_writes_table_and_plot(builtin, tmp_path):
    from multiway.cli import main

    out = tmp_path / "study"
    rc = main(["study", "meter", "--fast", "--data", str(builtin), "--out", str(out), "tasks=[vqa]", "objectives=[itm]",
               "pretrain_steps=1", "finetune_steps=1"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]  # the two fusions, then the lr control (first cell, new layers at x1)
    assert [(r["fusion"], r["lr_mult_top"], r["seeds"]) for r in rows] == [("co_attention", 5.0, 2), ("merged_attention", 5.0, 2),
                                                                          ("co_attention", 1.0, 2)]
    assert len(result["runs"]) == 6 and all("vqa_score_std" in r for r in rows) and 0 <= result["priors"]["nlvr2_acc"] <= 100
    assert all(0 <= r["vqa_score_blind"] <= 100 and "vqa_score_blind_std" in r for r in rows)  # the image-blind check ran
    md = (out / "results.md").read_text()
    assert md.startswith("| Fusion | Architecture") and " ± " in md and "| VQA, other images |" in md
    assert "| co-attention beats merged attention |" in md and "| a larger lr for the new layers helps |" in md
    assert (out / "results.png").stat().st_size > 1000


def test_findings_count_a_difference_only_beyond_the_spread():
    from multiway.meter.study import findings

    def row(fusion, arch, vqa, std, enc="vit+bert", top=5.0):
        return {"fusion": fusion, "architecture": arch, "objectives": "mlm+itm", "encoders": enc, "lr_mult_top": top,
                "vqa_score": vqa, "vqa_score_std": std}

    rows = [row("co_attention", "encoder_only", 20.0, 1.0), row("merged_attention", "encoder_only", 17.0, 1.0),  # 3 > 2: supports
            row("co_attention", "encoder_decoder", 10.0, 2.0), row("merged_attention", "encoder_decoder", 11.0, 2.0),  # within
            row("co_attention", "encoder_only", 12.0, 0.5, top=1.0)]
    by_claim = {f["claim"]: f for f in findings(rows)}
    assert by_claim["co-attention beats merged attention"]["finding"] == "supports (1 of 2 resolved)"
    assert by_claim["encoder-only beats encoder-decoder on discriminative tasks"]["finding"] == "supports"
    assert by_claim["a larger lr for the new layers helps"]["finding"] == "supports"
    assert by_claim["a pretrained text encoder matters"]["finding"].startswith("cannot resolve (no pair")
    rows[1]["vqa_score"] = 25.0  # merged now ahead beyond the spread in one pair
    assert findings(rows)[0]["finding"] == "contradicts (1 of 2 resolved)"


def test_one_axis_grid_varies_one_axis_at_a_time():
    from multiway.meter.study import StudyConfig, grid_cells

    cfg = StudyConfig(grid="one_axis", fusions=["co_attention", "merged_attention"], architectures=["encoder_only", "encoder_decoder"],
                      objectives=["mlm+itm", "itm"], encoders=["vit+bert_pretrained", "vit+bert", "vit+embedding"], lr_control=True)
    base = ("co_attention", "encoder_only", "mlm+itm", "vit+bert_pretrained", 5.0)
    assert grid_cells(cfg) == [
        base, ("merged_attention", *base[1:]), (base[0], "encoder_decoder", *base[2:]), (*base[:2], "itm", *base[3:]),
        (*base[:3], "vit+bert", 5.0), (*base[:3], "vit+embedding", 5.0), (*base[:4], 1.0),
    ]
    assert len(grid_cells(StudyConfig(**{**cfg.__dict__, "grid": "product"}))) == 2 * 2 * 2 * 3 + 1


def test_default_grid_resolves_every_claim_in_principle():
    """The default grid holds a pair of cells for each of the paper's claims (with clearly separated fake scores,
    every claim gets a verdict, none says that no pair exists)."""
    from multiway.meter.study import CELL_KEYS, StudyConfig, findings, grid_cells

    cfg = StudyConfig()
    assert len(cfg.seeds) >= 3
    rows = []
    for i, cell in enumerate(grid_cells(cfg)):
        row = dict(zip(CELL_KEYS, cell))
        row.update({"vqa_score": 10.0 * (i + 1), "vqa_score_std": 0.1})
        rows.append(row)
    result = findings(rows)
    assert len(result) == 4
    for f in result:
        assert f["evidence"] and not f["finding"].startswith("cannot resolve"), f


def test_masked_words_check_measures_the_image(builtin):
    """The check's two passes use the same masks: a fusion that cannot see the image (its image projection zeroed)
    scores exactly the same beside other images; the training's RNG stream is left as it was."""
    from multiway.meter.model import METERForPretraining
    from multiway.meter.study import StudyConfig, cell_config, load_study_data, masked_words_check

    cfg = StudyConfig(data_dir=str(builtin), batch_size=8, max_eval_items=24)
    data = load_study_data(cfg)
    mc = cell_config(cfg, "co_attention", "encoder_only", "mlm+itm", "vit+embedding", data, None)
    torch.manual_seed(0)
    model = METERForPretraining(mc, pad_id=data.spec.pad_id, bos_id=data.spec.bos_id, eos_id=data.spec.eos_id)
    pairs = data.splits["retrieval/val"]
    rng_before = torch.get_rng_state()
    seeing = masked_words_check(model, pairs, data.spec, mc.objectives, 8, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert set(seeing) == {"mlm_acc", "mlm_acc_blind", "mlm_image_gain"} and 0 <= seeing["mlm_acc"] <= 100
    with torch.no_grad():
        model.meter.image_proj.weight.zero_()
        model.meter.image_proj.bias.zero_()
    blind = masked_words_check(model, pairs, data.spec, mc.objectives, 8, seed=3)
    assert blind["mlm_image_gain"] == 0.0 and blind["mlm_acc"] == blind["mlm_acc_blind"]


def test_study_workers_give_the_same_table(builtin, tmp_path):
    """Runs side by side in worker processes give the runs of one process, in the grid's order."""
    from multiway.meter.study import FAST, StudyConfig, run_study

    def runs(workers: int) -> list[dict]:
        cfg = StudyConfig(**{**FAST, "data_dir": str(builtin), "out_dir": str(tmp_path / f"w{workers}"), "tasks": ["vqa"],
                             "objectives": ["itm"], "pretrain_steps": 1, "finetune_steps": 1, "workers": workers})
        run_study(cfg, progress=False)
        result = json.loads((tmp_path / f"w{workers}" / "results.json").read_text())
        timing = ("_s", "samples_per_s")
        return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in result["runs"]]

    one, two = runs(1), runs(2)
    assert len(one) == 6 and one == two


def test_study_rejects_unknown_axis_values():
    from multiway.meter.study import StudyConfig

    with pytest.raises(ValueError, match="study workers=0"):
        StudyConfig(workers=0)
    with pytest.raises(ValueError, match=r"study encoders: \['vit\+gpt'\].*accepted values: vit\+bert_pretrained"):
        StudyConfig(encoders=["vit+gpt"])


def test_retrieval_chance_matches_random_rankings():
    """The closed form equals the retrieval average of random rankings (recall computed by the shared metric)."""
    from multiway.downstream.metrics import retrieval_recall
    from multiway.meter.study import retrieval_chance

    caption_images = ["a"] * 3 + ["b"] * 5 + ["c"] * 2 + ["d"] * 4 + [f"x{i}" for i in range(8)]
    images = sorted(set(caption_images))
    text_to_image = torch.tensor([images.index(c) for c in caption_images])
    g = torch.Generator().manual_seed(0)

    def random_average() -> float:  # iid random features: every ranking equally likely, in both directions
        image_feats, text_feats = torch.randn(len(images), 16, generator=g), torch.randn(len(caption_images), 16, generator=g)
        return retrieval_recall(image_feats, torch.arange(len(images)), text_feats, text_to_image)["average"]

    averages = [random_average() for _ in range(2000)]
    assert sum(averages) / len(averages) == pytest.approx(retrieval_chance(caption_images), abs=0.6)
