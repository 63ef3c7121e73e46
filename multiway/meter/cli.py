"""``multiway study meter`` and ``multiway meter ...``: thin wrappers over :mod:`multiway.meter`."""

from __future__ import annotations

import argparse
import json


def _study(args: argparse.Namespace) -> int:
    from .study import StudyConfig, run_study, to_markdown

    overrides = dict(
        data_dir=args.data, out_dir=args.out, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
        fusions=args.fusions, architectures=args.architectures, objectives=args.objectives, encoders=args.encoders,
        tasks=args.tasks, precision=args.precision, seed=args.seed,
    )
    if args.config:
        cfg = StudyConfig.load(args.config, **overrides)
    else:
        cfg = StudyConfig(**{k: v for k, v in overrides.items() if v is not None})
    rows = run_study(cfg)
    print(to_markdown(rows))
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


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser("study", help="run a design study (METER grid)")
    study_sub = study.add_subparsers(dest="study", metavar="STUDY")
    p = study_sub.add_parser("meter", help="train and evaluate every cell of a METER grid; writes a table and a plot")
    p.add_argument("--data", default=None, help="data set folder (official index format); generated if missing (default data/builtin)")
    p.add_argument("--out", default=None, help="output folder (default runs/meter_study)")
    p.add_argument("--config", default=None, help="YAML study config (e.g. configs/meter_study_tiny.yaml)")
    p.add_argument("--fusions", nargs="+", default=None, help="co_attention merged_attention")
    p.add_argument("--architectures", nargs="+", default=None, help="encoder_only encoder_decoder")
    p.add_argument("--objectives", nargs="+", default=None, help="objective sets, e.g. mlm+itm mlm+itm+mim")
    p.add_argument("--encoders", nargs="+", default=None, help="encoder pairs, e.g. vit+bert_pretrained vit+embedding")
    p.add_argument("--tasks", nargs="+", default=None, help="vqa nlvr2 retrieval captioning")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=None)
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
    meter.set_defaults(func=lambda a: meter.print_help() or 2)
