"""``multiway export`` — a model part to ONNX or a ``torch.export`` program (see :mod:`multiway.export`)."""

from __future__ import annotations

import json

from . import FORMATS, PARTS, UNEXPORTABLE


def _export(args) -> int:
    from . import ExportError, export_model

    try:
        spec = export_model(args.model, part=args.part, fmt=args.format, out=args.out)
    except ExportError as e:
        raise SystemExit(f"export: {e}") from None
    print(json.dumps({"path": spec.path, "part": spec.part, "format": spec.format, "inputs": spec.inputs,
                      "outputs": spec.outputs, "max_abs_diff": spec.max_abs_diff}))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model part to ONNX or a torch.export program (.pt2)",
                              description="Preprocessing travels in the graph: pixels in [0, 1] are normalised inside, and the "
                                          "text padding mask is computed from the pad id. Batch and text length are dynamic.")
    p.add_argument("--model", required=True, help="a multiway finetune output folder or a .safetensors model")
    # the unexportable names are accepted here so that they get their explanation instead of an argparse error
    p.add_argument("--part", required=True, choices=[*PARTS, *UNEXPORTABLE], help="the part to export")
    p.add_argument("--format", default="onnx", choices=FORMATS)
    p.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    p.set_defaults(func=_export)
