"""The task interface: the registry, every task class against the DownstreamTask contract, a toy task added with one
registry line running finetune + evaluate end to end, and no branching on task or head names outside the task
modules."""

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import multiway
from multiway.config import ConfigError, from_dict
from multiway.downstream import metrics
from multiway.downstream.evaluation import evaluate
from multiway.downstream.finetune import FinetuneConfig, finetune
from multiway.downstream.tasks import (
    FAMILY_TASKS,
    TASKS,
    DataSettings,
    DownstreamTask,
    EvalSettings,
    PredictCommand,
    get_task,
    model_family,
    task_for_head,
    task_names,
)

# every registered class: BEiT-3's by name, the other families' by (name, family)
ALL_TASKS = {**{(name, "beit3"): cls for name, cls in TASKS.items()}, **{key: get_task(*key) for key in FAMILY_TASKS}}

ROOT = Path(__file__).resolve().parents[1]
# the official task names of the BEiT-3 paper's benchmarks (and our text task)
OFFICIAL = ["imagenet", "vqav2", "nlvr2", "coco_retrieval", "flickr30k", "coco_captioning", "nocaps", "text_classification"]


def test_registry_holds_the_official_names():
    assert list(TASKS)[: len(OFFICIAL)] == OFFICIAL
    for (name, family), cls in ALL_TASKS.items():
        assert cls.name == name, f"{cls.__name__}.name is {cls.name!r} but it is registered as {name!r}"
        assert cls.family == family, f"{cls.__name__}.family is {cls.family!r} but it is registered for {family!r}"
    assert get_task("vqav2") is TASKS["vqav2"]
    with pytest.raises(KeyError, match=r"unknown task 'vqa3' for beit3 models; valid tasks: imagenet, vqav2, nlvr2"):
        get_task("vqa3")
    assert task_for_head("retrieval") is TASKS["coco_retrieval"]  # the first task of that head
    with pytest.raises(KeyError, match="no task builds a 'bogus' model"):
        task_for_head("bogus")


def test_one_registry_for_both_families():
    from multiway.meter.snli_ve import SNLIVE
    from multiway.meter.tasks import METERVQA

    assert get_task("vqav2", "meter") is METERVQA and issubclass(METERVQA, TASKS["vqav2"])  # METER's VQA reuses BEiT-3's data
    assert get_task("snli_ve", "meter") is SNLIVE and "snli_ve" in task_names() and "snli_ve" not in task_names("beit3")
    assert model_family("meter_tiny_vit_bert_coattn") == "meter" and model_family("beit3_tiny_patch8_32") == "beit3"
    with pytest.raises(KeyError, match="unknown task 'snli_ve' for beit3 models"):
        get_task("snli_ve")
    with pytest.raises(KeyError, match="unknown task 'imagenet' for meter models; valid tasks: vqav2, nlvr2"):
        get_task("imagenet", "meter")
    with pytest.raises(KeyError, match="unknown model preset 'meter_huge'"):
        model_family("meter_huge")
    with pytest.raises(ConfigError, match="task: unknown task 'imagenet' for meter models"):
        from_dict(FinetuneConfig, {"task": "imagenet", "data_dir": "d", "out_dir": "o", "model": {"preset": "meter_tiny_vit_bert_coattn"},
                                   "train": {"max_steps": 1}})


@pytest.mark.parametrize("key", list(ALL_TASKS), ids=[f"{f}:{n}" for n, f in ALL_TASKS])
def test_every_task_satisfies_the_interface(key):
    cls = ALL_TASKS[key]
    assert issubclass(cls, DownstreamTask) and not inspect.isabstract(cls), f"{cls.__name__} leaves {cls.__abstractmethods__}"
    assert cls.name and cls.head and cls.metric and cls.metric_label and cls.splits, cls
    assert "train" in cls.splits and all(isinstance(files, tuple) and files for files in cls.splits.values())
    assert cls.normalize in ("vl", "imagenet")
    assert dataclasses.is_dataclass(cls.Options)
    task = cls()  # every option has a default
    assert isinstance(task.options, cls.Options)
    assert cls({}).options == task.options  # a mapping of the fields builds the same options
    fields = [f.name for f in dataclasses.fields(cls.Options)]
    with pytest.raises(ConfigError, match=r"unknown key 'options.bogus'; valid keys of options"):
        cls({"bogus": 1})
    if fields:
        assert cls({fields[0]: getattr(task.options, fields[0])}).options == task.options
    if cls.recipe:
        assert (ROOT / "configs" / cls.recipe).is_file(), f"{cls.__name__}.recipe names a missing file {cls.recipe}"
    for command in cls.predict_commands:
        assert isinstance(command, PredictCommand) and callable(command.add_arguments) and callable(command.run)
    with pytest.raises(KeyError, match=f"task {cls.name!r} has no split 'nope'"):
        task.index_files("nope")


def test_predict_commands_are_unique_per_name():
    # tasks sharing a head share its commands (coco_retrieval / flickr30k); two different commands never share a name
    by_name: dict[str, PredictCommand] = {}
    for cls in TASKS.values():
        for command in cls.predict_commands:
            assert by_name.setdefault(command.name, command) is command, command.name
    assert {"caption", "vqa", "classify", "nlvr2", "embed", "search", "classify-text"} <= set(by_name)


# --- a toy task through one registry line ----------------------------------------------------------------------


class _Brightness(Dataset):
    """Random 32 px images, label 1 when the image is bright (seeded per split)."""

    def __init__(self, split: str, n: int = 32):
        g = torch.Generator().manual_seed({"train": 0, "val": 1}[split])
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.images = torch.randn(n, 3, 32, 32, generator=g) * 0.3 + (self.labels.float() * 2 - 1)[:, None, None, None]
        self.items = [{"label": int(v)} for v in self.labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


@dataclasses.dataclass
class _ToyOptions:
    scale: float = 1.0  # logits multiplier (an option of the task's own)


class ToyBrightness(DownstreamTask):
    """Is the image bright? Image classification head, accuracy."""

    name = "toy_brightness"
    head = "imageclassification"
    metric, metric_label = "acc", "accuracy"
    splits = {"train": ("none",), "val": ("none",)}
    Options = _ToyOptions

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        return _Brightness(split)

    def num_classes(self, train_set):
        return 2

    def loss(self, model, batch, step=0):
        logits = model(image=batch["image"]) * self.options.scale
        return torch.nn.functional.cross_entropy(logits, batch["label"]), {}

    @torch.no_grad()
    def evaluate(self, model, dataset, settings=None):
        logits = torch.cat([model(image=b["image"]) for b in self.device_batches(model, dataset, settings or EvalSettings())])
        return {"acc": metrics.accuracy(logits, dataset.labels)}

    def chance_level(self, train_set, test_set):
        return 50.0


def test_a_task_added_with_one_registry_line_finetunes_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "toy_brightness", ToyBrightness)  # the one registry line
    cfg = from_dict(FinetuneConfig, dict(task="toy_brightness", data_dir=str(tmp_path), out_dir=str(tmp_path / "run"),
                                         model={"preset": "beit3_tiny_patch8_32"}, batch_size=8, options={"scale": 2.0},
                                         train={"max_steps": 12, "lr": 2e-3, "warmup_steps": 1, "save_every": 0, "progress": False}))
    assert cfg.options == _ToyOptions(scale=2.0)
    result = finetune(cfg, progress=False)
    run = tmp_path / "run"
    assert result["acc"] > 75, result  # bright vs dark is easy: well above the 50% chance
    meta = json.loads((run / "task.json").read_text())
    assert meta["task"] == "toy_brightness" and meta["model_task"] == "imageclassification" and meta["options"] == {"scale": 2.0}
    (run / "eval_val.json").unlink()
    again = evaluate(run, split="val")
    assert again == pytest.approx(result) and json.loads((run / "eval_val.json").read_text()) == again
    model = multiway.create_model(run / "model.safetensors")
    assert model.head.out_features == 2
    with pytest.raises(ConfigError, match=r"options.bogus"):
        from_dict(FinetuneConfig, dict(task="toy_brightness", data_dir="d", out_dir="o", epochs=1, options={"bogus": 1}))


# --- no branching on task or head names outside the task modules ---------------------------------------------------

TASK_MODULES = {"multiway/downstream/tasks", "multiway/meter/tasks.py", "multiway/meter/snli_ve.py"}
# Modules outside the task modules that still compare task names, and why. The runners (finetune, evaluate, predict,
# the quickstart, the CLI, the METER study) must not appear here.
KNOWN_BRANCHES = {
    "multiway/data/cli.py": "multiway data build-index: one builder per raw public data set (their raw formats differ)",
    "multiway/data/raw_indexes.py": "the raw Flickr30k layout keeps its images in flickr30k-images/",
    "multiway/data/transforms.py": "build_transform('imagenet', ...) still selects timm's ImageNet recipe by name",
    "multiway/export/__init__.py": "ONNX export: which graph part (retrieval encoders, VQA head) is exported",
    "multiway/meter/arrow.py": "METER's .arrow tables: each table's schema, converted to its task's index files",
    "multiway/planning/planner.py": "memory planner: the input shapes each model head takes",
}
RUNNERS = ["multiway/downstream/finetune.py", "multiway/downstream/evaluation.py", "multiway/downstream/predict.py",
           "multiway/downstream/inference.py", "multiway/downstream/quickstart.py", "multiway/downstream/cli.py",
           "multiway/meter/study.py"]


def _branch_pattern() -> re.Pattern:
    names = {*task_names(), *(c.head for c in ALL_TASKS.values()), "vqa", "retrieval", "captioning"}  # + the METER study's names
    alt = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    return re.compile(rf"""(==|!=)\s*["']({alt})["']|["']({alt})["']\s*(==|!=)|\bin\s*[(\[{{][^)\]}}]*["']({alt})["'][^)\]}}]*[)\]}}]\s*:"""
                      r"""|\.head\s+in\s*[(\[{]""")


def _branches(path: Path) -> list[str]:
    pattern = _branch_pattern()
    return [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line) and not line.lstrip().startswith("#")]


def test_the_pattern_finds_branches():
    pattern = _branch_pattern()
    for line in ('if spec.head == "captioning":', "if task == 'vqav2':", 'if name in ("vqav2", "nlvr2"):', 'if "nlvr2" != kind:',
                 'if spec.head in ("a", "b"):'):
        assert pattern.search(line), line
    for line in ('TASKS = {"vqav2": VQAv2}', 'get_task("vqav2")', 'name = "vqav2"', "if task_cls.head != head:"):
        assert not pattern.search(line), line


def test_no_branching_on_task_or_head_names_outside_the_task_modules():
    found = {}
    for path in sorted((ROOT / "multiway").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel == m or rel.startswith(m + "/") for m in TASK_MODULES):
            continue
        hits = _branches(path)
        if hits:
            found[rel] = hits
    for runner in RUNNERS:
        assert runner not in found, f"{runner} branches on task names: {found.get(runner)}"
    unexplained = {rel: hits for rel, hits in found.items() if rel not in KNOWN_BRANCHES}
    assert not unexplained, f"branches on task/head names outside the task modules (move them into the task class): {unexplained}"


# --- the commands: key=value overrides and --print-config -------------------------------------------------------


def test_finetune_evaluate_quickstart_take_overrides_and_print_config(capsys):
    import yaml

    from multiway.cli import main

    def printed(argv):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        return yaml.safe_load(capsys.readouterr().out)

    cfg = printed(["finetune", "vqav2", "--config", "configs/finetune_vqav2_base.yaml", "train.lr=2e-4", "model.drop_path_rate=0.1",
                   "--data-dir", "data/vqa", "options={}", "--print-config"])
    assert cfg["train"]["lr"] == 2e-4 and cfg["model"]["drop_path_rate"] == 0.1 and cfg["data_dir"] == "data/vqa"
    assert cfg["model"]["preset"] == "beit3_base_patch16_480" and cfg["train"]["head_lr_scale"] == 20.0
    assert main(["finetune", "vqav2", "--config", "configs/finetune_vqav2_base.yaml", "train.lrr=1", "--data-dir", "d"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lrr'" in err and "'lr'" in err and "'warmup_steps'" in err
    assert main(["finetune", "vqav2", "--config", "configs/finetune_vqav2_base.yaml", "model.drop_path=0.1", "--data-dir", "d"]) == 2
    assert "valid keys of model" in capsys.readouterr().err

    cfg = printed(["evaluate", "--model", "runs/x", "split=test", "options.num_beams=1", "--print-config"])
    assert cfg["model"] == "runs/x" and cfg["split"] == "test" and cfg["options"] == {"num_beams": 1}
    assert main(["evaluate", "--model", "runs/x", "spilt=test"]) == 2
    assert "unknown key 'spilt'" in capsys.readouterr().err

    cfg = printed(["quickstart", "--fast", "tasks.vqav2.steps=9", "pretrain_steps=3", "--print-config"])
    assert cfg["tasks"]["vqav2"]["steps"] == 9 and cfg["tasks"]["vqav2"]["lr"] == 1e-3 and cfg["pretrain_steps"] == 3
    assert cfg["num_images"] == 160  # the fast preset under the overrides
    assert main(["quickstart", "tasks.vqav2.stepz=9"]) == 2
    assert "unknown key 'tasks.vqav2.stepz'" in capsys.readouterr().err
    assert main(["quickstart", "tasks.vqa3.steps=9"]) == 2
    assert "unknown quickstart task(s) ['vqa3']" in capsys.readouterr().err
