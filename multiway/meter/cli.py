"""``multiway study meter`` and ``multiway meter ...``: thin wrappers over :mod:`multiway.meter`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import add_config_arguments, config_from_args


def _study(args: argparse.Namespace) -> int:
    from .study import FAST, StudyConfig, run_study

    updates = {k: v for k, v in (("data_dir", args.data), ("out_dir", args.out)) if v is not None}
    cfg = config_from_args(StudyConfig, args, base=FAST if args.fast else None, updates=updates)
    run_study(cfg)
    print(Path(cfg.out_dir, "results.md").read_text())  # the cell table, the priors and the findings
    print(f"results: {cfg.out_dir}/results.md, results.json, results.png")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .config import MeterConfig, get_meter_config
    from .model import METERModel, count_parameters

    cfg = MeterConfig.load(args.preset) if args.preset.endswith((".yaml", ".yml", ".json")) else get_meter_config(args.preset)
    print(json.dumps(cfg.to_dict(), indent=1, default=list))
    if args.build:
        print(f"parameters: {count_parameters(METERModel(cfg)):,}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .config import PRESETS
    from .study import ENCODERS, OBJECTIVES

    print("presets:", ", ".join(sorted(PRESETS)))
    print("study encoders:", ", ".join(ENCODERS))
    print("study objectives:", ", ".join(OBJECTIVES))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .checkpoints import from_official, save_meter

    model = from_official(args.checkpoint, args.task, image_size=args.image_size, num_heads=args.num_heads)
    save_meter(model, args.output)
    print(f"{args.checkpoint} -> {args.output} ({type(model).__name__}, {model.meter.vision.img_size} px)")
    return 0


def _arrow2jsonl(args: argparse.Namespace) -> int:
    from .arrow import convert_arrow

    tokenizer = None
    if args.task != "pretraining":
        from ..tokenizers.text import TextTokenizer

        tokenizer = TextTokenizer(args.tokenizer)
    report = convert_arrow(args.table, args.data_dir, tokenizer, args.task, args.split, on_error=args.on_error)
    for name, count in report.counts.items():
        print(f"{args.data_dir}/{name}: {count}")
    print(f"{report.rows} rows read; {report.errors.summary()}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser("study", help="run a design study (METER grid)")
    study_sub = study.add_subparsers(dest="study", metavar="STUDY")
    p = study_sub.add_parser("meter", help="train and evaluate every cell of a METER grid; writes a table and a plot")
    p.add_argument("--data", default=None, help="data set folder (official index format); generated if missing (default data/builtin)")
    p.add_argument("--out", default=None, help="output folder (default runs/meter_study)")
    p.add_argument("--fast", action="store_true", help="the CI smoke budget (multiway.meter.study.FAST) under --config and overrides")
    add_config_arguments(p, "YAML study config (e.g. configs/meter_study_tiny.yaml); axes and budgets as overrides: "
                            "fusions=[co_attention] encoders=[vit+embedding] pretrain_steps=100 precision=bf16")
    p.set_defaults(func=_study)
    study.set_defaults(func=lambda a: study.print_help() or 2)

    meter = subparsers.add_parser("meter", help="METER models: presets and configs")
    meter_sub = meter.add_subparsers(dest="meter_command", metavar="COMMAND")
    q = meter_sub.add_parser("info", help="print a preset's (or YAML file's) config; --build counts parameters")
    q.add_argument("preset")
    q.add_argument("--build", action="store_true")
    q.set_defaults(func=_info)
    q = meter_sub.add_parser("list", help="list presets and the study's axes")
    q.set_defaults(func=_list)
    q = meter_sub.add_parser(
        "convert", help="convert a released METER .ckpt (Lightning, read weights-only) to a multiway METER safetensors file"
    )
    q.add_argument("checkpoint", help="official METER checkpoint, e.g. meter_clip16_288_roberta_vqa.ckpt")
    q.add_argument("output", help="output .safetensors (config embedded; multiway.meter.checkpoints.load_meter reads it)")
    tasks = ["pretraining", "vqa", "nlvr2", "snli_ve", "retrieval"]
    q.add_argument("--task", default="pretraining", choices=tasks, help="which heads to keep")
    q.add_argument("--image-size", type=int, default=None, help="resolution (default: the checkpoint's); tables adapted as METER does")
    q.add_argument("--num-heads", type=int, default=None, help="text/fusion heads (default: the checkpoint's config, else width/64)")
    q.set_defaults(func=_convert)
    q = meter_sub.add_parser("arrow2jsonl", help="convert a METER/ViLT .arrow table to the official BEiT-3 jsonl index")
    q.add_argument("table", help="e.g. coco_caption_karpathy_test.arrow, vqav2_train.arrow, nlvr2_dev.arrow, snli_dev.arrow")
    q.add_argument("--data-dir", required=True, help="output folder: the index and the table's images (arrow_images/)")
    from .arrow import TARGETS

    q.add_argument("--task", required=True, choices=list(TARGETS))
    q.add_argument("--split", required=True, help="split name of the index (train, val, test, rest_val, ...)")
    q.add_argument("--tokenizer", default=None, help="SentencePiece model for the text ids (not needed for --task pretraining)")
    q.add_argument("--on-error", default="skip", choices=["skip", "raise"], help="broken rows: skip and count (default) or stop")
    q.set_defaults(func=_arrow2jsonl)
    meter.set_defaults(func=lambda a: meter.print_help() or 2)
