"""Fine-tuning: every task head's loss falls on fixtures; the end-to-end run; golden-weight evaluation parity."""

import json

import pytest
import torch
from conftest import GOLDEN_CONFIG, golden_meta, load_golden
from downstream_data import write_downstream_data

import multiway
from multiway.config import ConfigError, from_dict, load_config
from multiway.downstream import metrics
from multiway.downstream.evaluation import OtherImages, evaluate
from multiway.downstream.finetune import FinetuneConfig, finetune
from multiway.downstream.losses import captioning_loss, vqa_loss
from multiway.downstream.tasks import DataSettings, EvalSettings, get_task
from multiway.tokenizers.text import TextTokenizer, train_text_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    corpus = write_downstream_data(root)
    spm = train_text_tokenizer([corpus], root / "spm", vocab_size=40, hard_vocab_limit=False)
    return root, spm


def _model(task, num_classes=None):
    return get_task(task)().build_model("beit3_tiny_patch8_32", num_classes)


def _settings(root, spm):
    return DataSettings(str(root), tokenizer=TextTokenizer(spm), max_text_len=12, img_size=32)


@pytest.mark.parametrize("task", ["imagenet", "vqav2", "nlvr2", "coco_retrieval", "coco_captioning", "text_classification"])
def test_task_loss_falls(task, data):
    root, spm = data
    torch.manual_seed(0)
    t = get_task(task)({"mask_prob": 0.5} if task == "coco_captioning" else None)
    ds = t.build_dataset("train", _settings(root, spm))
    stride = len(ds) // 4 if task == "coco_retrieval" else max(1, len(ds) // 8)  # retrieval: distinct captions
    batch = t.collate([ds[i] for i in range(0, len(ds), stride)][:8])
    n = t.num_classes(ds)
    assert n == {"imagenet": 4, "vqav2": 4, "nlvr2": 2, "text_classification": 4}.get(task)
    model = t.build_model("beit3_tiny_patch8_32", n).train()
    # from scratch the dual encoder first collapses at a high lr; it needs a gentle one
    lr, steps, factor = (1e-4, 25, 0.97) if task == "coco_retrieval" else (2e-3, 20, 0.85)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, logs = t.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < factor * losses[0], losses


@pytest.mark.parametrize("task", ["vqav2", "nlvr2"])
def test_other_images_keeps_texts_and_labels_and_swaps_the_images(task, data):
    root, spm = data
    t = get_task(task)()
    ds = t.build_dataset("val", _settings(root, spm))
    other = OtherImages(ds)
    assert len(other) == len(ds)
    images = lambda item: torch.cat([item[k] for k in ("image", "image2") if k in item])  # noqa: E731
    for i in range(len(ds)):
        mine, swapped = ds[i], other[i]
        assert swapped["language_tokens"] == mine["language_tokens"]
        label = "labels" if "labels" in mine else "label"
        assert torch.equal(torch.as_tensor(swapped[label]), torch.as_tensor(mine[label]))
        # never the example's own picture, even where several questions in a row ask about one image
        assert not torch.equal(images(swapped), images(mine))
        j = next(j for j in range(i + 1, i + len(ds)) if not torch.equal(images(ds[j % len(ds)]), images(mine)))
        assert torch.equal(images(swapped), images(ds[j % len(ds)]))  # the first other image from i + 1 on
    # several questions in a row about one image (as in VQAv2): the next example would bring the same picture back
    runs = torch.utils.data.Subset(ds, [0, 0, 0, 1, 1, 2])
    swapped = [images(x) for x in OtherImages(runs)]
    assert [torch.equal(x, images(ds[k])) for x, k in zip(swapped, [1, 1, 1, 2, 2, 0])] == [True] * 6
    assert other.items is ds.items  # attributes the evaluation reads come from the wrapped dataset
    # through a DataLoader too: a Subset's __getitems__ (which the loader prefers) must not bypass the swap
    for wrapped in (other, OtherImages(torch.utils.data.Subset(ds, range(len(ds))))):
        batch = next(iter(torch.utils.data.DataLoader(wrapped, batch_size=len(ds), collate_fn=list)))
        assert all(torch.equal(images(b), images(wrapped[i])) for i, b in enumerate(batch))
    torch.manual_seed(0)
    n = ds.num_labels if task == "vqav2" else 2
    model = _model(task, n)
    result = t.evaluate(model, other, EvalSettings(batch_size=4))
    assert t.metric in result
    with pytest.raises(ValueError, match="two examples"):
        OtherImages(torch.utils.data.Subset(ds, [0]))
    with pytest.raises(ValueError, match="nothing to swap in"):
        OtherImages(torch.utils.data.Subset(ds, [0, 0]))[0]


def test_vqa_loss_is_bce_summed_over_answers():
    logits, targets = torch.randn(3, 5), torch.rand(3, 5)
    manual = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 3
    torch.testing.assert_close(vqa_loss(logits, targets), manual)


def test_captioning_loss_label_smoothing_and_drop_worst():
    logits = torch.randn(10, 7)
    targets = torch.randint(0, 7, (10,))
    eps = 0.1
    q = torch.full((10, 7), eps / 6).scatter_(1, targets[:, None], 1 - eps)
    per_token = (q * (q.log() - logits.log_softmax(-1))).sum(1)
    torch.testing.assert_close(captioning_loss(logits, targets, step=0), per_token.mean())
    kept = per_token.sort().values[:8]  # drop the worst 20% once past drop_worst_after
    torch.testing.assert_close(captioning_loss(logits, targets, step=13, drop_worst_after=12), kept.mean())


def test_finetune_run_evaluate(data, tmp_path):
    root, spm = data
    cfg = from_dict(FinetuneConfig, dict(task="vqav2", data_dir=str(root), out_dir=str(tmp_path / "run"),
                    model={"preset": "beit3_tiny_patch8_32"}, tokenizer=str(spm), batch_size=8, max_text_len=12,
                    train={"max_steps": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "save_every": 0, "progress": False}))
    result = finetune(cfg, progress=False)
    assert "vqa_score" in result
    run = tmp_path / "run"
    assert (run / "model.safetensors").is_file()
    assert json.loads((run / "task.json").read_text())["labels"] == ["red", "green", "blue", "yellow"]
    (run / "eval_val.json").unlink()
    again = evaluate(run, split="val")
    assert again["vqa_score"] == pytest.approx(result["vqa_score"])
    assert json.loads((run / "eval_val.json").read_text()) == again  # evaluate writes eval_<split>.json into the run
    # the saved config reads back as the same config
    assert load_config(FinetuneConfig, run / "finetune_config.yaml") == cfg


def test_finetune_from_scratch_is_reproducible_whatever_ran_before(data, tmp_path):
    # the fresh model's init must come from the run's seed, not from the process's RNG history
    from safetensors.torch import load_file

    root, spm = data
    weights = []
    for i in range(2):
        torch.rand(i * 7 + 1)  # different RNG history before each run
        cfg = from_dict(FinetuneConfig, dict(task="coco_captioning", data_dir=str(root), out_dir=str(tmp_path / f"run{i}"),
                        model={"preset": "beit3_tiny_patch8_32"}, tokenizer=str(spm), batch_size=4, max_text_len=12,
                        options={"caption_metrics": ["CIDEr"], "max_gen_len": 4, "num_beams": 1},
                        train={"max_steps": 2, "lr": 1e-3, "save_every": 0, "progress": False}))
        finetune(cfg, progress=False)
        weights.append(load_file(tmp_path / f"run{i}" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_finetune_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: vqav2\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(FinetuneConfig, path, ["data_dir=d", "out_dir=o", "epochs=1"])
    with pytest.raises(ConfigError, match="unknown task 'vqa3'.*valid tasks: imagenet, vqav2"):
        from_dict(FinetuneConfig, dict(task="vqa3", data_dir="d", out_dir="o", epochs=1))
    base = dict(task="coco_captioning", data_dir="d", out_dir="o")
    with pytest.raises(ConfigError, match="train.max_steps or epochs"):
        from_dict(FinetuneConfig, base)
    # the model section takes MultiwayConfig's fields, checked by name and type; options are the task's own fields
    with pytest.raises(ConfigError, match="model.drop_path_rat'.*drop_path_rate"):
        from_dict(FinetuneConfig, {**base, "epochs": 1, "model": {"drop_path_rat": 0.1}})
    with pytest.raises(ConfigError, match="model.depth"):
        from_dict(FinetuneConfig, {**base, "epochs": 1, "model": {"depth": "deep"}})
    with pytest.raises(ConfigError, match="options.mixup'.*mask_prob"):
        from_dict(FinetuneConfig, {**base, "epochs": 1, "options": {"mixup": 0.8}})


def test_official_recipes_and_overrides():
    import glob

    for path in glob.glob("configs/finetune_*.yaml"):
        cfg = load_config(FinetuneConfig, path, ["data_dir=d"])
        assert cfg.epochs or cfg.train.max_steps, path
    cfg = load_config(FinetuneConfig, "configs/finetune_vqav2_base.yaml", ["train.lr=2e-4", "model.drop_path_rate=0.2", "data_dir=d"])
    assert cfg.train.lr == 2e-4 and cfg.model.drop_path_rate == 0.2 and cfg.model.preset == "beit3_base_patch16_480"
    assert cfg.train.head_lr_scale == 20.0 and cfg.epochs == 10  # the rest of the recipe is kept
    cap = load_config(FinetuneConfig, "configs/finetune_coco_captioning_base.yaml", ["options.num_beams=1", "data_dir=d"])
    assert cap.options.num_beams == 1 and cap.options.mask_prob == 0.7 and cap.model.config_overrides() == {
        "drop_path_rate": 0.1, "grad_checkpointing": True}
    imagenet = load_config(FinetuneConfig, "configs/finetune_imagenet_base.yaml", ["data_dir=d"])
    assert (imagenet.options.mixup, imagenet.options.cutmix, imagenet.options.label_smoothing) == (0.8, 1.0, 0.1)


def test_exponent_numbers_in_configs_are_floats(tmp_path):
    from multiway.config import load_yaml

    # PyYAML alone reads 2e-3 as the string "2e-3" (YAML 1.1 wants a dot), which the optimiser then rejects
    assert load_yaml("lr: 2e-3\nmin_lr: 1E-6\nwd: 5.0e-2\nsteps: 10\nname: e5\nv: 1.2.3") == {
        "lr": 0.002, "min_lr": 1e-6, "wd": 0.05, "steps": 10, "name": "e5", "v": "1.2.3"}
    path = tmp_path / "c.yaml"
    path.write_text("task: vqav2\ntrain:\n  lr: 3e-4\n  max_steps: 5\n")
    cfg = load_config(FinetuneConfig, path, ["data_dir=d", "out_dir=o"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)


# --- golden weights: our evaluation path gives the official heads' predictions -------------------------------


class _Rows(torch.utils.data.Dataset):
    def __init__(self, **cols):
        self.cols = cols

    def __len__(self):
        return len(next(iter(self.cols.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.cols.items()}


def _golden(task, **head):
    sd, i, o = load_golden(task)
    model = multiway.create_model(f"beit3_base_patch16_224_{task}", **GOLDEN_CONFIG, **head)
    multiway.load_checkpoint(model, sd)
    return model.eval(), i, o


def test_golden_evaluation_matches_official_predictions():
    # image classification: top-1 of our evaluation == top-1 of the official logits
    model, i, o = _golden("imageclassification", num_classes=golden_meta("imageclassification")["num_classes"])
    labels = o["logits"].argmax(-1)
    res = get_task("imagenet")().evaluate(model, _Rows(image=i["image"], label=labels), EvalSettings(batch_size=1))
    assert res["acc@1"] == 100.0
    # VQA: soft targets put 1.0 on the official arg-max answer -> score 100
    model, i, o = _golden("vqav2", num_classes=golden_meta("vqav2")["vqa_num_classes"])
    targets = torch.zeros_like(o["logits"]).scatter_(1, o["logits"].argmax(-1, keepdim=True), 1.0)
    res = get_task("vqav2")().evaluate(model, _Rows(image=i["image"], language_tokens=i["text_ids"], padding_mask=i["padding_mask"],
                                                    labels=targets))
    assert res["vqa_score"] == 100.0
    # NLVR2
    model, i, o = _golden("nlvr2")
    res = get_task("nlvr2")().evaluate(model, _Rows(image=i["image"], image2=i["image2"], language_tokens=i["text_ids"],
                                                      padding_mask=i["padding_mask"], label=o["logits"].argmax(-1)))
    assert res["acc"] == 100.0
    # retrieval: recall from our embeddings == recall from the official embeddings
    model, i, o = _golden("retrieval")
    ids = torch.arange(2)
    res = get_task("coco_retrieval")().evaluate(model, _Rows(image=i["image"], language_tokens=i["text_ids"],
                                                             padding_mask=i["padding_mask"], image_id=ids))
    assert res == pytest.approx({**metrics.retrieval_recall(o["vision_cls"], ids, o["language_cls"], ids), "r@1": res["r@1"]})
