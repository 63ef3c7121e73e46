"""``multiway finetune | evaluate | predict | quickstart`` — thin wrappers over :mod:`multiway.downstream`.

Every command takes ``--config FILE``, ``key=value`` overrides (values parsed as YAML) and ``--print-config``;
``multiway predict`` has one sub-command per prediction a registered task offers on user files.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import add_config_arguments, config_from_args
from .tasks import TASKS, PredictCommand, task_names


def _updates(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """Config values set by the command's flags (``{"flag_dest": "dotted.key"}``); flags not given set nothing."""
    from ..config import set_dotted

    out: dict[str, Any] = {}
    for dest, key in flags.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_dotted(out, key, value)
    return out


_FINETUNE_FLAGS = {"data_dir": "data_dir", "out_dir": "out_dir", "init": "model.init", "tokenizer": "tokenizer", "model": "model.preset",
                   "batch_size": "batch_size"}


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, check_model_size, finetune

    cfg = config_from_args(FinetuneConfig, args, base={"task": args.task}, updates=_updates(args, _FINETUNE_FLAGS))
    if cfg.task != args.task:
        raise SystemExit(f"{args.config} is a {cfg.task} config but the command says {args.task}")
    check_model_size(cfg, config_given=bool(args.config), allow_large=args.allow_large)
    print(json.dumps(finetune(cfg), indent=2))
    return 0


_EVALUATE_FLAGS = {"task": "task", "model": "model", "data_dir": "data_dir", "split": "split", "tokenizer": "tokenizer",
                   "batch_size": "batch_size", "out_dir": "out_dir"}


def _evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    from .evaluation import EvaluateConfig, evaluate

    cfg = config_from_args(EvaluateConfig, args, updates=_updates(args, _EVALUATE_FLAGS))
    print(json.dumps(evaluate(**dataclasses.asdict(cfg)), indent=2))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import QuickstartConfig, quickstart

    cfg = config_from_args(QuickstartConfig, args, base=QuickstartConfig.preset_dict("fast" if args.fast else "full"))
    if args.seeds:
        from .quickstart_seeds import parse_seeds, quickstart_seeds

        try:
            seeds = parse_seeds(args.seeds)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        quickstart_seeds(seeds, out_dir=args.out_dir, config=cfg)
        return 0
    quickstart(out_dir=args.out_dir, seed=args.seed, config=cfg)
    return 0


def _predict_commands() -> list[PredictCommand]:
    """Every ``multiway predict`` sub-command of the registered tasks, once each (tasks may share one)."""
    seen: dict[str, PredictCommand] = {}
    for cls in TASKS.values():
        for command in cls.predict_commands:
            seen.setdefault(command.name, command)
    return list(seen.values())


def _predict(args: argparse.Namespace) -> int:
    from .inference import load_predictor

    pred = load_predictor(args.model, tokenizer=args.tokenizer, labels=getattr(args, "labels", None), model_name=args.model_name)
    # the model's own task runs the command (METER's tasks offer some of BEiT-3's commands with their own code)
    offered = {c.name: c for c in type(pred.downstream).predict_commands}
    if args.predict_command.name not in offered:
        raise ValueError(f"predict {args.predict_command.name}: {args.model} is a {pred.downstream.family} {pred.downstream.name} model; "
                         f"its predictions: {', '.join(offered) or 'none'}")
    return offered[args.predict_command.name].run(args, pred)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    tasks = task_names()  # every family's: a METER preset (model.preset=meter_...) also trains snli_ve
    p = subparsers.add_parser("finetune", help="fine-tune a task head (official recipes as YAML presets in configs/)")
    p.add_argument("task", choices=tasks)
    add_config_arguments(p, "YAML config (configs/finetune_*.yaml); flags and key=value overrides change it")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--out-dir", dest="out_dir")
    p.add_argument("--init", help="model.init: checkpoint to start from (official .pth, multiway .safetensors); omit for scratch")
    p.add_argument("--tokenizer", help="SentencePiece model (beit3.spm or your own)")
    p.add_argument("--model", help="model.preset, e.g. beit3_base_patch16_480")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--allow-large", dest="allow_large", action="store_true",
                   help="without --config, build a >= 200M-parameter model on a CPU anyway (refused otherwise)")
    p.set_defaults(func=_finetune)

    p = subparsers.add_parser("evaluate", help="evaluate a fine-tuned model with the task's standard metric (writes eval_<split>.json)")
    add_config_arguments(p, "YAML of EvaluateConfig fields")
    p.add_argument("--task", choices=tasks, help="default: the run's task")
    p.add_argument("--model", help="a finetune output folder or a multiway .safetensors")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--split", help="val (default), test, test-dev (VQA splits without answers write the submission json)")
    p.add_argument("--tokenizer")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--out-dir", dest="out_dir", help="default: the run folder")
    p.set_defaults(func=_evaluate)

    p = subparsers.add_parser("predict", help="inference on your own files: " + ", ".join(c.name for c in _predict_commands()))
    sp = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    for command in _predict_commands():
        q = sp.add_parser(command.name, help=command.help)
        q.add_argument("--model", required=True, help="a finetune output folder or a multiway .safetensors")
        q.add_argument("--tokenizer", help="SentencePiece model (default: the one the model file or run carries)")
        q.add_argument("--model-name", dest="model_name",
                       help="the model an official .pth holds, e.g. beit3_base_patch16_480_vqav2 (files without a config)")
        q.add_argument("--json", action="store_true", help="one JSON object per line")
        q.add_argument("--strict", action="store_true", help="exit with status 1 if any input was skipped (named on stderr)")
        command.add_arguments(q)
        q.set_defaults(func=_predict, predict_command=command)

    p = subparsers.add_parser("quickstart", help="synthetic data -> tiny pretraining -> fine-tune + evaluate every mode")
    add_config_arguments(p, "YAML of QuickstartConfig fields over the preset (tasks: {vqav2: {steps: 500}})")
    p.add_argument("--out-dir", dest="out_dir", default="quickstart")
    p.add_argument("--fast", action="store_true", help="the smoke preset (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: one run per seed (OUT/seed_<s>), then a mean ± std table")
    p.set_defaults(func=_quickstart)


__all__ = ["add_commands"]
