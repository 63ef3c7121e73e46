"""Evaluation runs (``multiway evaluate``): a fine-tuned run folder or model file, scored with its task's standard
metric on a split; and :class:`OtherImages`, the image-blind check of the fusion tasks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..config import deep_update, read_yaml_mapping, resolve_path
from .finetune import load_tokenizer
from .tasks import DataSettings, EvalSettings, get_task, model_file_family
from .tasks.base import evaluation_mode


@dataclass
class EvaluateConfig:
    """Settings of ``multiway evaluate``; what is left out comes from the run folder."""

    model: str  # a `multiway finetune` run folder, or a multiway .safetensors model (then give task and data_dir)
    task: str | None = None  # default: the run's task
    data_dir: str | None = None  # default: the run's data_dir
    split: str = "val"  # val, test, test-dev (VQA splits without answers write the submission json)
    tokenizer: str | None = None  # default: the run's tokenizer
    batch_size: int = 64
    num_workers: int = 0
    device: str | None = None  # default: cuda when available, else cpu
    out_dir: str | None = None  # eval_<split>.json and prediction files; default: the run folder (or the model's folder)
    options: dict[str, Any] = field(default_factory=dict)  # task options over the run's, e.g. options.num_beams=1


def evaluate(model: str | Path, task: str | None = None, data_dir: str | None = None, split: str = "val", tokenizer: str | None = None,
             batch_size: int = 64, num_workers: int = 0, device: str | None = None, out_dir: str | None = None,
             options: dict[str, Any] | None = None) -> dict[str, float]:
    """Evaluate a fine-tuned run folder (or a ``.safetensors`` model plus ``task``/``data_dir``) on ``split``.

    The metrics are returned and written to ``<out_dir>/eval_<split>.json``; the task writes its prediction files
    there too (VQA submission for unlabelled splits, generated captions). Arguments: see :class:`EvaluateConfig`.
    """

    path = resolve_path(model, "model", must_exist=True)
    saved: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    if path.is_dir():
        if (path / "finetune_config.yaml").is_file():
            saved = read_yaml_mapping(path / "finetune_config.yaml")
        if (path / "task.json").is_file():
            meta = json.loads((path / "task.json").read_text())
        folder, path = path, path / "model.safetensors"
    else:
        folder = path.parent
    from ..model.checkpoints import read_model_extras

    extras = read_model_extras(path) if path.is_file() else None
    if extras is not None and extras.task:  # a model file saved with its task (finetune, save_pretrained(task=...))
        meta = {**extras.task, **{k: v for k, v in meta.items() if v is not None}}
    task = task or saved.get("task") or meta.get("task")
    data_dir = data_dir or saved.get("data_dir")
    if not task or not data_dir:
        raise ValueError(f"evaluate {model}: give task and data_dir (or a run folder written by `multiway finetune`)")
    task_cls = get_task(task, model_file_family(str(path)))
    downstream = task_cls(deep_update(meta.get("options") or saved.get("options") or {}, options or {}))
    net = task_cls.load_model(path)
    net.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    tok = load_tokenizer(tokenizer or saved.get("tokenizer") or meta.get("tokenizer"))
    if tok is None and extras is not None and extras.tokenizer is not None:
        from ..tokenizers.text import TextTokenizer

        tok = TextTokenizer.from_bytes(extras.tokenizer, f"{path} (embedded tokenizer)")
    img_size, text_limit = task_cls.model_limits(net)
    pre = (extras.preprocessing if extras is not None else None) or {}
    max_text_len = int(saved.get("max_text_len") or meta.get("max_text_len") or pre.get("max_text_len") or 64)
    data = DataSettings(data_dir, tokenizer=tok, max_text_len=min(max_text_len, text_limit), img_size=img_size, labels=meta.get("labels"))
    dataset = downstream.build_dataset(split, data)
    results = Path(out_dir) if out_dir else folder
    settings = EvalSettings(batch_size=batch_size, num_workers=num_workers, out_dir=str(results), split=split)
    with evaluation_mode(net):
        result = downstream.evaluate(net, dataset, settings)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"eval_{split}.json").write_text(json.dumps(result, indent=2))
    return result


class OtherImages(Dataset):
    """The examples of ``dataset``, each with the image(s) of another example (same text, labels).

    The partner of example ``i`` is the first example from ``i + offset`` on (cyclically) whose image differs from
    example ``i``'s: in VQA several questions in a row ask about one image, so the next example would often
    bring back the same picture. A model's score here is what it gets without reading the image: the gap to its
    real score measures how much it uses the image (a VQA model can score well from the question alone)."""

    _IMAGE_KEYS = ("image", "image2")

    def __init__(self, dataset: Dataset, offset: int = 1):
        if len(dataset) < 2:
            raise ValueError("OtherImages needs at least two examples")
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return len(self.dataset)

    def _same_images(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in self._IMAGE_KEYS if k in a)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        n = len(self.dataset)
        for step in range(n - 1):
            other = self.dataset[(index + self.offset + step) % n]
            if not self._same_images(item, other):
                break
        else:
            raise ValueError(f"OtherImages: every example shows the image(s) of example {index}; nothing to swap in")
        for key in self._IMAGE_KEYS:
            if key in item:
                item[key] = other[key]
        return item

    def __getattr__(self, name: str) -> Any:  # label2answer, items, tokenizer ... of the wrapped dataset
        # never the protocol methods: a DataLoader calls a Subset's ``__getitems__`` if it finds one, which would
        # hand back the wrapped examples with their own images
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


__all__ = ["EvaluateConfig", "OtherImages", "evaluate"]
