"""``multiway pretrain`` and ``multiway plot``: thin wrappers over :func:`pretrain` and :func:`plot_run`."""

from __future__ import annotations

import argparse
import json

from multiway.config import add_config_arguments, config_from_args


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import PretrainConfig, pretrain

    cfg = config_from_args(PretrainConfig, args)
    metrics = pretrain(cfg, resume=not args.no_resume)
    print(json.dumps(metrics, indent=1))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="BEiT-3 masked-data-modeling pretraining (torchrun for several processes)",
        description="Pretrain a Multiway Transformer. Multi-GPU: torchrun --nproc_per_node N -m multiway.cli pretrain ...",
    )
    add_config_arguments(p, "YAML recipe, e.g. configs/pretrain_tiny.yaml (default: PretrainConfig's defaults)")
    p.add_argument("--no-resume", action="store_true", help="start over even if train.out_dir has checkpoints")
    p.set_defaults(func=_pretrain)

    q = subparsers.add_parser("plot", help="PNG curves (loss, accuracy, lr, throughput) from RUN_DIR/metrics.csv")
    q.add_argument("run_dir")
    q.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR)")
    q.set_defaults(func=_plot)
