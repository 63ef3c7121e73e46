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

    def __post_init__(self) -> None:
        check_keys(self.model_config, (f.name for f in dataclasses.fields(MultiwayConfig)), "model_config")
        for name in ("checkpoint", "output", "model"):
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
    p.add_argument("--model", help="model name, e.g. beit3_base_patch16_224_retrieval (sets model=)")
    add_config_arguments(p, "a YAML file of ConvertConfig keys (model, model_config, head)")
    p.set_defaults(func=_convert)


def _models(args: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def _convert(args: argparse.Namespace) -> int:
    updates = {"checkpoint": args.checkpoint, "output": args.output, **({"model": args.model} if args.model else {})}
    cfg = config_from_args(ConvertConfig, args, updates=updates)
    model = create_model(cfg.model, **cfg.model_config, **cfg.head)
    report = load_checkpoint(model, cfg.checkpoint)
    print(report)
    path = save_pretrained(model, cfg.output)
    print(f"wrote {path}")
    return 0
