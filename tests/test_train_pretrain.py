"""Pretraining task, optimiser groups, schedule, CLI and plots — tiny preset, tiny built-in data."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import multiway
from multiway.train import TrainConfig, build_param_groups, cosine_lr
from multiway.train.optim import LRSchedule
from multiway.train.pretrain import PretrainTask, load_pretrain_config, pretrain


def test_param_groups_follow_the_official_rules():
    model = multiway.create_model("beit3_tiny_patch8_32_pretraining", codebook_size=64)
    cfg = TrainConfig(out_dir="x", max_steps=1, weight_decay=0.05, layer_decay=0.5, head_lr_scale=10.0)
    groups = build_param_groups(model, cfg)
    where = {n: g for g in groups for n in g["names"]}
    assert set(where) == {n for n, _ in model.named_parameters()}
    no_decay = ["beit3.vision_embed.cls_token", "beit3.vision_embed.mask_token", "beit3.encoder.embed_positions.A.weight",
                "beit3.encoder.embed_positions.B.weight", "beit3.encoder.layers.0.self_attn.q_proj.A.bias",
                "beit3.encoder.layers.1.final_layer_norm.B.weight", "mlm_head.bias"]
    for n in no_decay:
        assert where[n]["weight_decay"] == 0.0, n
    for n in ("beit3.text_embed.weight", "beit3.vision_embed.proj.weight", "beit3.encoder.layers.1.ffn.A.fc1.weight", "mim_head.weight"):
        assert where[n]["weight_decay"] == 0.05, n
    # layer ids: embeddings 0, layers.i -> i+1, rest L+1 (L = 2); scale = 0.5 ** (L + 1 - id)
    assert where["beit3.text_embed.weight"]["lr_scale"] == 0.5**3
    assert where["beit3.encoder.embed_positions.B.weight"]["lr_scale"] == 0.5**3
    assert where["beit3.encoder.layers.0.ffn.A.fc1.weight"]["lr_scale"] == 0.5**2
    assert where["beit3.encoder.layers.1.ffn.A.fc1.weight"]["lr_scale"] == 0.5**1
    assert where["beit3.encoder.layer_norm.A.weight"]["lr_scale"] == 1.0
    assert where["mlm_head.weight"]["lr_scale"] == 10.0  # head: L+1 and the head multiplier
    # retrieval's logit_scale is exempt from decay
    ret = multiway.create_model("beit3_tiny_patch8_32_retrieval")
    where = {n: g for g in build_param_groups(ret, cfg) for n in g["names"]}
    assert where["logit_scale"]["weight_decay"] == 0.0


def test_cosine_schedule_with_warmup():
    assert cosine_lr(0, 1.0, 0.1, 10, 100) == 0.0
    assert cosine_lr(5, 1.0, 0.1, 10, 100) == pytest.approx(0.5)
    assert cosine_lr(10, 1.0, 0.1, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)
    assert cosine_lr(100, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}], lr=1.0)
    sched = LRSchedule(opt, 1.0, 0.0, 4, 8)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen[:4] == [0.125, 0.25, 0.375, 0.5]  # update n uses lr(n) * lr_scale
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)
    sd = sched.state_dict()
    sched2 = LRSchedule(opt, 1.0, 0.0, 4, 8)
    sched2.load_state_dict(sd)
    assert math.isclose(opt.param_groups[0]["lr"], 0.5 * cosine_lr(9, 1.0, 0.0, 4, 8))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from multiway.data.shapes import generate_synthetic_dataset
    from multiway.tokenizers.vqkd import VQKD, save_vqkd, vqkd_config

    root = tmp_path_factory.mktemp("shapes")
    generate_synthetic_dataset(root, num_images=40, num_pairs=10, imagenet_per_class=4, vocab_size=200, shard_size=10, progress=False)
    torch.manual_seed(0)
    vq = save_vqkd(VQKD(vqkd_config("vqkd_tiny_patch8_32")), root / "vqkd.safetensors")
    return root, vq


def _cfg(root, vq, out, *more):
    return load_pretrain_config(
        "configs/pretrain_tiny.yaml",
        [f"data.dir={root}", f"text_tokenizer={root / 'shapes.spm'}", f"data.text={root / 'corpus.txt'}", f"data.image={root / 'shards'}",
         f"data.pair={root / 'shards'}", f"data.eval_pairs={root / 'coco_retrieval.val.jsonl'}",
         f"visual_tokenizer={vq}", f"train.out_dir={out}", "batch={text: 4, image: 4, pair: 4}",
         "data.num_workers=0", "data.eval_size=16", "train.progress=false", *more],
    )


def test_pretrain_batches_mask_as_the_paper_says_and_resume_exactly(tiny_data, tmp_path):
    from multiway.tokenizers import TextTokenizer, load_vqkd

    root, vq = tiny_data
    cfg = _cfg(root, vq, tmp_path, "pair_image_mask_ratio=0.4")
    tok = TextTokenizer(root / "shapes.spm")
    model = multiway.create_model("beit3_tiny_patch8_32_pretraining", codebook_size=64)
    task = PretrainTask(cfg, model.config, tok, load_vqkd(vq))
    batches = list(itertools.islice(task.train_batches(0, 1, seed=0, start_step=0), 4))
    b = batches[0]
    assert set(b) == {"text", "image", "pair", "num_samples"} and b["num_samples"] == 12
    t = b["text"]
    real = (t["padding_mask"] == 0).sum(1)
    maskable = real - 2  # <s> and </s> are never masked
    assert t["text_masked_positions"].sum(1).tolist() == [max(1, round(0.15 * int(n))) for n in maskable]
    assert (t["text_ids"][t["text_masked_positions"]] == tok.mask_id).all()
    p = b["pair"]
    pm = (p["padding_mask"] == 0).sum(1) - 2
    assert p["text_masked_positions"].sum(1).tolist() == [max(1, round(0.5 * int(n))) for n in pm]
    assert b["image"]["image_masked_positions"].shape == (4, 16)
    assert b["image"]["image_masked_positions"].sum(1).tolist() == [6] * 4  # round(0.4 * 16), block-wise, exact
    assert p["image_masked_positions"].sum(1).tolist() == [6] * 4
    assert b["image"]["image"].shape == (4, 3, 32, 32)
    # loss: finite, every stream present, targets from the tokenizer
    loss, logs = task.loss(model, b)
    assert torch.isfinite(loss) and {"text/loss", "image/loss", "pair_text/loss", "pair_image/loss"} <= set(logs)
    # resuming at micro-batch 2 gives exactly batches 2 and 3 (augmentation and masks included)
    again = list(itertools.islice(task.train_batches(0, 1, seed=0, start_step=2), 2))
    for x, y in zip(batches[2:], again):
        for stream in ("text", "image", "pair"):
            for k in x[stream]:
                assert torch.equal(x[stream][k], y[stream][k]), (stream, k)
    # the training RNG is untouched by the data pipeline
    torch.manual_seed(5)
    ref = torch.rand(3)
    torch.manual_seed(5)
    next(iter(task.train_batches(0, 1, seed=0, start_step=0)))
    assert torch.equal(torch.rand(3), ref)


def test_pretrain_end_to_end_cli_and_plots(tiny_data, tmp_path):
    from multiway.cli import main

    root, vq = tiny_data
    out = tmp_path / "run"
    cfg = _cfg(root, vq, out, "train.max_steps=3", "train.log_every=1", "train.eval_every=2", "train.save_every=2")
    metrics = pretrain(cfg)
    for k in ("eval/text_acc", "eval/text_majority", "eval/image_acc", "eval/image_majority", "eval/pair_text_acc"):
        assert 0.0 <= metrics[k] <= 1.0, k
    assert (out / "checkpoints/step_00000003/model.safetensors").is_file()
    vqa = multiway.create_model("beit3_tiny_patch8_32_vqav2")
    multiway.load_checkpoint(vqa, out / "checkpoints/step_00000003/model.safetensors")
    assert main(["plot", str(out)]) == 0
    for name in ("loss", "accuracy", "lr", "throughput"):
        assert (out / f"{name}.png").stat().st_size > 1000


def test_shuffled_image_accuracy_measures_what_the_model_reads_from_the_image(tiny_data):
    from multiway.tokenizers import TextTokenizer, load_vqkd
    from multiway.train.objectives import masked_accuracy_counts, other_image_order

    root, vq = tiny_data
    cfg = _cfg(root, vq, root / "unused", "pair_image_mask_ratio=0.4")
    torch.manual_seed(0)
    model = multiway.create_model("beit3_tiny_patch8_32_pretraining", codebook_size=64).eval()
    task = PretrainTask(cfg, model.config, TextTokenizer(root / "shapes.spm"), load_vqkd(vq))
    pair = task._targets(next(task.train_batches(0, 1, seed=0, start_step=0))["pair"])
    with torch.no_grad():
        counts = masked_accuracy_counts(model, {"pair": pair})
        assert counts["pair_text_shuffled"][1] == counts["pair_text"][1] == int(pair["text_masked_positions"].sum())
        # the same image and image mask in every row: rolling the batch changes nothing, the accuracies agree exactly
        assert pair["image_masked_positions"].any()
        same = {**pair, "image": pair["image"][:1].expand_as(pair["image"]).clone(),
                "image_masked_positions": pair["image_masked_positions"][:1].expand_as(pair["image_masked_positions"]).clone()}
        c = masked_accuracy_counts(model, {"pair": same})
        assert c["pair_text_shuffled"] == c["pair_text"]
        # the shuffled pass sees each other image as it was seen in its own pair: masked by that pair's mask
        calls = []

        def recording(**kwargs):
            calls.append(kwargs)
            return model(**kwargs)

        masked_accuracy_counts(recording, {"pair": pair})
        order = other_image_order(pair["image"])
        assert torch.equal(calls[1]["image"], pair["image"][order])
        assert torch.equal(calls[1]["image_masked_positions"], pair["image_masked_positions"][order])
        # captions come several per image: each caption gets the next *different* picture, never its own
        runs = pair["image"][[0, 0, 0, 1, 1, 2]]
        assert other_image_order(runs).tolist() == [3, 3, 3, 5, 5, 0]
        assert other_image_order(pair["image"][[0, 0]]).tolist() == [0, 1]  # one picture only: nothing to swap
        # a model whose masked-text logits depend on the image: rolled images give other predictions
        text_logits, _ = model(image=pair["image"], text_ids=pair["text_ids"], padding_mask=pair["padding_mask"],
                               text_masked_positions=pair["text_masked_positions"])
        rolled, _ = model(image=pair["image"].roll(1, 0), text_ids=pair["text_ids"], padding_mask=pair["padding_mask"],
                          text_masked_positions=pair["text_masked_positions"])
        assert not torch.allclose(text_logits, rolled)
    metrics = task.evaluate(model)
    assert 0.0 <= metrics["pair_text_shuffled_acc"] <= 1.0
    assert metrics["pair_text_shuffled_majority"] == metrics["pair_text_majority"]


def test_contrastive_pretraining_matches_the_retrieval_model_and_hands_it_the_heads(tiny_data, tmp_path):
    from multiway.model.heads import contrastive_loss
    from multiway.tokenizers import TextTokenizer, load_vqkd
    from multiway.train.objectives import pair_contrastive_loss, unmasked_text

    root, vq = tiny_data
    cfg = _cfg(root, vq, tmp_path / "unused", "itc_weight=0.5")
    torch.manual_seed(0)
    model = multiway.create_model("beit3_tiny_patch8_32_pretraining", codebook_size=64, contrastive=True)
    task = PretrainTask(cfg, model.config, TextTokenizer(root / "shapes.spm"), load_vqkd(vq))
    batch = next(task.train_batches(0, 1, seed=0, start_step=0))
    pair = task._targets(batch["pair"])
    # the masked words are put back: the contrastive text is the caption itself
    text = unmasked_text(pair)
    assert pair["text_masked_positions"].any() and not (text == TextTokenizer(root / "shapes.spm").mask_id).any()
    assert torch.equal(text[~pair["text_masked_positions"]], pair["text_ids"][~pair["text_masked_positions"]])
    # the retrieval model built from the pretraining weights computes the same loss: same heads, same names
    retrieval = multiway.create_model("beit3_tiny_patch8_32_retrieval")
    report = multiway.load_checkpoint(retrieval, model.state_dict())
    assert {"vision_head.weight", "language_head.weight", "logit_scale"} <= set(report.loaded)
    model.eval(), retrieval.eval()
    with torch.no_grad():
        itc, image_to_text, text_to_image = pair_contrastive_loss(model, pair)
        ref, image_feats, text_feats = retrieval(image=pair["image"], text_description=text, padding_mask=pair["padding_mask"])
        assert itc.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(image_feats, model.encode_image(pair["image"]), atol=1e-6)
        sim = image_feats @ text_feats.t()
        assert torch.equal(image_to_text, sim.argmax(1) == torch.arange(len(text)))
        assert torch.equal(text_to_image, sim.argmax(0) == torch.arange(len(text)))
        # the loss is the CLIP loss of those features (not of the masked text)
        masked_text_feats = model.encode_text(pair["text_ids"], pair["padding_mask"])
        masked_loss, _, _ = contrastive_loss(image_feats, masked_text_feats, model.logit_scale.exp())
        assert masked_loss.item() != pytest.approx(itc.item(), rel=1e-4)
    # the task loss adds itc_weight * ITC to masked data modeling, and logs it
    model.train()
    torch.manual_seed(1)
    total, logs = task.loss(model, batch)
    mdm = sum(logs[f"{p}/loss"] for p in ("text", "image", "pair_text"))  # pair images unmasked here
    assert total.item() == pytest.approx(mdm + 0.5 * logs["itc/loss"], rel=1e-4)
    assert 0.0 <= logs["itc/acc"] <= 1.0
    # held-out in-batch retrieval is reported with its chance level
    metrics = task.evaluate(model.eval())
    assert 0.0 <= metrics["itc_i2t_acc"] <= 1.0 and 0.0 <= metrics["itc_t2i_acc"] <= 1.0
    assert metrics["itc_chance"] == pytest.approx(1 / 16)  # eval_size 16: one batch of 16 pairs
    # a model without the heads is refused with a clear message
    plain = multiway.create_model("beit3_tiny_patch8_32_pretraining", codebook_size=64)
    with pytest.raises(ValueError, match="contrastive=True"):
        pair_contrastive_loss(plain, pair)


def test_contrastive_pretraining_learns_to_match_images_and_captions(tiny_data, tmp_path):
    from multiway.tokenizers import TextTokenizer, load_vqkd
    from multiway.train.objectives import pair_contrastive_loss

    root, vq = tiny_data
    cfg = _cfg(root, vq, tmp_path / "unused", "itc_weight=1.0", "batch={text: 0, image: 0, pair: 8}")
    torch.manual_seed(0)
    model = multiway.create_model("beit3_tiny_patch8_32_pretraining", codebook_size=64, contrastive=True, drop_path_rate=0.0)
    task = PretrainTask(cfg, model.config, TextTokenizer(root / "shapes.spm"), load_vqkd(vq))
    pair = task.collate("pair", list(itertools.islice(task._stream("pair", 0, 1, 0), 8)), 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):  # one fixed batch: the image of each pair must come to pick out its caption
        loss, hits, _ = pair_contrastive_loss(model, pair)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0] and bool(hits.all())
    # through the pretraining entry point: logged, evaluated, and the checkpoint rebuilds the heads
    out = tmp_path / "itc"
    metrics = pretrain(_cfg(root, vq, out, "itc_weight=1.0", "train.max_steps=2", "train.lr=2e-3",  # 2e-3: a float, not a string
                            "train.log_every=1", "train.save_every=2"))
    from multiway.train.metrics_log import read_metrics

    assert all("itc/loss" in r for r in read_metrics(out) if "pair_text/loss" in r)
    assert 0.0 <= metrics["eval/itc_i2t_acc"] <= 1.0 and metrics["eval/itc_chance"] == pytest.approx(1 / 16)
    rebuilt = multiway.create_model(out / "checkpoints/step_00000002/model.safetensors")
    assert rebuilt.contrastive and rebuilt.vision_head.weight.shape == (64, 64)
