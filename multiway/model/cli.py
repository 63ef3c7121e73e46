"""``multiway models`` and ``multiway convert``."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import add_config_arguments, check_keys, config_from_args
from .checkpoints import load_checkpoint, save_pretrained
from .config import MultiwayConfig
from .factory import create_model, list_models


@dataclass
class ConvertConfig:
    """``multiway convert``: load a checkpoint into a named model and save it as a multiway ``.safetensors`` file."""

    checkpoint: str = ""  # official .pth/.pt or .safetensors file (the first positional argument)
    output: str = ""  # output .safetensors path (the second positional argument)
    model: str = ""  # model name, e.g. beit3_base_patch16_224_retrieval (multiway models lists them)
    model_config: dict[str, Any] = field(default_factory=dict)  # MultiwayConfig fields changed from the preset
    head: dict[str, Any] = field(default_factory=dict)  # head arguments, e.g. num_classes: 10
    tokenizer: str = ""  # SentencePiece model embedded in the output (beit3.spm), so no command needs --tokenizer
    task: str = ""  # downstream task whose preprocessing is embedded (default: the first task of the model's head)
    labels: str = ""  # class names / answers embedded in the output (answer2label.txt, or one name per line)
    max_text_len: int = 64  # text length with specials, embedded in the preprocessing

    def __post_init__(self) -> None:
        check_keys(self.model_config, (f.name for f in dataclasses.fields(MultiwayConfig)), "model_config")
        for name in ("checkpoint", "output"):
            if not getattr(self, name):
                raise ValueError(f"convert needs {name} (e.g. multiway convert official.pth out.safetensors "
                                 "--model beit3_base_patch16_224_retrieval)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the buildable model names")
    p.set_defaults(func=_models)

    p = subparsers.add_parser(
        "convert",
        help="convert an official BEiT-3 .pth checkpoint into a multiway .safetensors file (config embedded)",
        description="Loads CHECKPOINT into the model NAME (e.g. beit3_base_patch16_480_vqav2), with the same checks "
        "as multiway.load_checkpoint, and saves it so that multiway.create_model(OUTPUT) rebuilds it alone. "
        "Overrides: model_config.<MultiwayConfig field>=VALUE, head.<argument>=VALUE (head.num_classes=10).",
    )
    p.add_argument("checkpoint", help="official .pth/.pt or .safetensors file")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--model", "--model-name", dest="model", help="model name, e.g. beit3_base_patch16_224_retrieval (sets model=)")
    p.add_argument("--tokenizer", help="SentencePiece model to embed (sets tokenizer=)")
    p.add_argument("--task", help="downstream task whose preprocessing and name are embedded (sets task=)")
    p.add_argument("--labels", help="class names / answers to embed: answer2label.txt or one name per line (sets labels=)")
    add_config_arguments(p, "a YAML file of ConvertConfig keys (model, model_config, head)")
    p.set_defaults(func=_convert)


def _models(args: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def _convert(args: argparse.Namespace) -> int:
    updates = {"checkpoint": args.checkpoint, "output": args.output,
               **{k: getattr(args, k) for k in ("model", "tokenizer", "task", "labels") if getattr(args, k)}}
    cfg = config_from_args(ConvertConfig, args, updates=updates)
    if not cfg.model:
        from .factory import fitting_presets_message

        raise ValueError(fitting_presets_message(cfg.checkpoint))
    model = create_model(cfg.model, **cfg.model_config, **cfg.head)
    report = load_checkpoint(model, cfg.checkpoint)
    print(report)
    path = save_pretrained(model, cfg.output, tokenizer=cfg.tokenizer or None, **_task_extras(model, cfg))
    print(f"wrote {path}")
    return 0


def _task_extras(model: Any, cfg: ConvertConfig) -> dict[str, Any]:
    """The preprocessing and task metadata of the converted model's task (none for a bare backbone)."""
    from ..downstream.inference import read_labels
    from ..downstream.tasks import get_task, task_for_head
    from .heads import model_name_of

    head = model_name_of(model)
    if not head:
        return {}
    task_cls = get_task(cfg.task) if cfg.task else task_for_head(head)
    if task_cls.head != head:
        raise ValueError(f"task={cfg.task!r} takes a {task_cls.head} model, but {cfg.model} is a {head} model")
    task = task_cls()
    labels = read_labels(cfg.labels) if cfg.labels else None
    meta = {"task": task.name, "model_task": head, "normalize": task.normalize, "labels": labels, "max_text_len": cfg.max_text_len}
    return {"preprocessing": task.preprocessing(model.config.img_size, cfg.max_text_len), "task": meta}
