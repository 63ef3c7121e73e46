"""Fine-tuning: every task head's loss falls on fixtures; the end-to-end run; golden-weight evaluation parity."""

import json

import pytest
import torch
from conftest import GOLDEN_CONFIG, golden_meta, load_golden
from downstream_data import write_downstream_data

import multiway
from multiway.downstream import metrics
from multiway.downstream.finetune import FinetuneConfig, evaluate, finetune
from multiway.downstream.losses import captioning_loss, vqa_loss
from multiway.downstream.task_specs import TASKS, EvalOptions, LossOptions, OtherImages, build_dataset, collate, evaluate_model, task_loss
from multiway.tokenizers.text import TextTokenizer, train_text_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    corpus = write_downstream_data(root)
    spm = train_text_tokenizer([corpus], root / "spm", vocab_size=40, hard_vocab_limit=False)
    return root, spm


def _model(task, num_classes=None):
    head = TASKS[task].head
    kwargs = {"num_classes": num_classes} if num_classes else {}

    return multiway.create_model(f"beit3_tiny_patch8_32_{head}", **kwargs)


@pytest.mark.parametrize("task", ["imagenet", "vqav2", "nlvr2", "coco_retrieval", "coco_captioning", "text_classification"])
def test_task_loss_falls(task, data):
    root, spm = data
    torch.manual_seed(0)
    tok = TextTokenizer(spm)
    spec = TASKS[task]
    ds = build_dataset(spec, root, "train", tokenizer=tok, max_len=12, img_size=32, **({"mask_prob": 0.5} if spec.head == "captioning" else {}))
    stride = len(ds) // 4 if spec.head == "retrieval" else max(1, len(ds) // 8)  # retrieval: distinct captions
    batch = collate([ds[i] for i in range(0, len(ds), stride)][:8])
    n = {"imagenet": 4, "vqav2": 4, "nlvr2": 2, "text_classification": 4}.get(task)
    model = _model(task, n).train()
    # from scratch the dual encoder first collapses at a high lr; it needs a gentle one
    lr, steps, factor = (1e-4, 25, 0.97) if spec.head == "retrieval" else (2e-3, 20, 0.85)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    opts = LossOptions(num_classes=n or 0)
    losses = []
    for _ in range(steps):
        loss, logs = task_loss(spec, model, batch, opts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < factor * losses[0], losses


@pytest.mark.parametrize("task", ["vqav2", "nlvr2"])
def test_other_images_keeps_texts_and_labels_and_swaps_the_images(task, data):
    root, spm = data
    spec = TASKS[task]
    ds = build_dataset(spec, root, "val", tokenizer=TextTokenizer(spm), max_len=12, img_size=32)
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
    torch.manual_seed(0)
    n = ds.num_labels if task == "vqav2" else 2
    model = _model(task, n)
    result = evaluate_model(spec, model, other, EvalOptions(batch_size=4))
    assert spec.metric in result
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
    cfg = FinetuneConfig(task="vqav2", data_dir=str(root), out_dir=str(tmp_path / "run"), model="beit3_tiny_patch8_32",
                         tokenizer=str(spm), batch_size=8, max_text_len=12,
                         train={"max_steps": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "save_every": 0, "progress": False})
    result = finetune(cfg, progress=False)
    assert "vqa_score" in result
    run = tmp_path / "run"
    assert (run / "model.safetensors").is_file() and json.loads((run / "task.json").read_text())["labels"] == ["red", "green", "blue", "yellow"]
    again = evaluate(run, split="val")
    assert again["vqa_score"] == pytest.approx(result["vqa_score"])


def test_finetune_from_scratch_is_reproducible_whatever_ran_before(data, tmp_path):
    # the fresh model's init must come from the run's seed, not from the process's RNG history
    from safetensors.torch import load_file

    root, spm = data
    weights = []
    for i in range(2):
        torch.rand(i * 7 + 1)  # different RNG history before each run
        cfg = FinetuneConfig(task="coco_captioning", data_dir=str(root), out_dir=str(tmp_path / f"run{i}"),
                             model="beit3_tiny_patch8_32", tokenizer=str(spm), batch_size=4, max_text_len=12,
                             caption_metrics=["CIDEr"], max_gen_len=4, num_beams=1,
                             train={"max_steps": 2, "lr": 1e-3, "save_every": 0, "progress": False})
        finetune(cfg, progress=False)
        weights.append(load_file(tmp_path / f"run{i}" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_finetune_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: vqav2\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        FinetuneConfig.load(path, data_dir="d", out_dir="o")
    with pytest.raises(KeyError, match="unknown task"):
        FinetuneConfig(task="vqa3", data_dir="d", out_dir="o")


def test_exponent_numbers_in_configs_are_floats(tmp_path):
    from multiway.config import load_yaml

    # PyYAML alone reads 2e-3 as the string "2e-3" (YAML 1.1 wants a dot), which the optimiser then rejects
    assert load_yaml("lr: 2e-3\nmin_lr: 1E-6\nwd: 5.0e-2\nsteps: 10\nname: e5\nv: 1.2.3") == {
        "lr": 0.002, "min_lr": 1e-6, "wd": 0.05, "steps": 10, "name": "e5", "v": "1.2.3"}
    path = tmp_path / "c.yaml"
    path.write_text("task: vqav2\ntrain:\n  lr: 3e-4\n  max_steps: 5\n")
    cfg = FinetuneConfig.load(path, data_dir="d", out_dir="o")
    assert cfg.train["lr"] == 3e-4 and isinstance(cfg.train["lr"], float)


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
    res = evaluate_model(TASKS["imagenet"], model, _Rows(image=i["image"], label=labels), EvalOptions(batch_size=1))
    assert res["acc@1"] == 100.0
    # VQA: soft targets put 1.0 on the official arg-max answer -> score 100
    model, i, o = _golden("vqav2", num_classes=golden_meta("vqav2")["vqa_num_classes"])
    targets = torch.zeros_like(o["logits"]).scatter_(1, o["logits"].argmax(-1, keepdim=True), 1.0)
    res = evaluate_model(TASKS["vqav2"], model, _Rows(image=i["image"], language_tokens=i["text_ids"], padding_mask=i["padding_mask"], labels=targets))
    assert res["vqa_score"] == 100.0
    # NLVR2
    model, i, o = _golden("nlvr2")
    res = evaluate_model(TASKS["nlvr2"], model, _Rows(image=i["image"], image2=i["image2"], language_tokens=i["text_ids"],
                                                      padding_mask=i["padding_mask"], label=o["logits"].argmax(-1)))
    assert res["acc"] == 100.0
    # retrieval: recall from our embeddings == recall from the official embeddings
    model, i, o = _golden("retrieval")
    ids = torch.arange(2)
    res = evaluate_model(TASKS["coco_retrieval"], model, _Rows(image=i["image"], language_tokens=i["text_ids"], padding_mask=i["padding_mask"], image_id=ids))
    assert res == pytest.approx({**metrics.retrieval_recall(o["vision_cls"], ids, o["language_cls"], ids), "r@1": res["r@1"]})
