"""The ``multiway`` command line: thin wrappers over the Python API.

Each area of the library contributes its subcommands through an ``add_commands(subparsers)`` function
in its own ``cli`` module, so this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define ``add_commands(subparsers)``; each sets ``func`` on its parsers.
COMMAND_MODULES = (
    "multiway.model.cli",
    "multiway.tokenizers.cli",
    "multiway.data.cli",
    "multiway.train.cli",
    "multiway.downstream.cli",
    "multiway.meter.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multiway", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that area has no commands yet
                continue
            raise
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
