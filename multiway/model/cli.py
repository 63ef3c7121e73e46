"""``multiway models`` and ``multiway convert``."""

from __future__ import annotations

import argparse
import json

from .checkpoints import load_checkpoint, save_pretrained
from .factory import create_model, list_models


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the buildable model names")
    p.set_defaults(func=_models)

    p = subparsers.add_parser(
        "convert",
        help="convert an official BEiT-3 .pth checkpoint into a multiway .safetensors file (config embedded)",
        description="Loads CHECKPOINT into the model NAME (e.g. beit3_base_patch16_480_vqav2), with the same checks "
        "as multiway.load_checkpoint, and saves it so that multiway.create_model(OUTPUT) rebuilds it alone.",
    )
    p.add_argument("checkpoint", help="official .pth/.pt or .safetensors file")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--model", required=True, help="model name, e.g. beit3_base_patch16_224_retrieval")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config/head overrides (JSON values), e.g. num_classes=10")
    p.set_defaults(func=_convert)


def _models(args: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _convert(args: argparse.Namespace) -> int:
    model = create_model(args.model, **parse_overrides(args.set))
    report = load_checkpoint(model, args.checkpoint)
    print(report)
    path = save_pretrained(model, args.output)
    print(f"wrote {path}")
    return 0
