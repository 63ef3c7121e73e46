"""The ``multiway`` command line: thin wrappers over the Python API.

Each area of the library contributes its subcommands through an ``add_commands(subparsers)`` function
in its own ``cli`` module, so this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from multiway.config import parse_args

# Modules that define ``add_commands(subparsers)``; each sets ``func`` on its parsers.
COMMAND_MODULES = (
    "multiway.model.cli",
    "multiway.tokenizers.cli",
    "multiway.data.cli",
    "multiway.train.cli",
    "multiway.downstream.cli",
    "multiway.meter.cli",
    "multiway.export.cli",
    "multiway.index.cli",
    "multiway.serve.cli",
    "multiway.planning.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multiway", description=__doc__.splitlines()[0],
                                     epilog="--debug (or MULTIWAY_DEBUG=1) shows tracebacks instead of one-line errors")
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


# Optional packages and the extra that installs each (pyproject.toml's optional-dependencies).
OPTIONAL_EXTRAS = {
    "transformers": "meter",
    "pyarrow": "meter",
    "faiss": "serve",
    "onnx": "serve",
    "onnxruntime": "serve",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "pycocotools": "dense",
    "seqeval": "dense",
}

# Exceptions that mean "the input was wrong": one message line, not a traceback. Anything else is a bug and keeps
# its traceback.
USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _message(error: BaseException) -> str:
    # KeyError's str() is the repr of its argument; its message is the argument itself.
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error prints one ``error: ...`` line and exits 2; ``--debug`` (or
    ``MULTIWAY_DEBUG=1``) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MULTIWAY_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    parser = build_parser()
    args = parse_args(parser, argv)  # also collects key=value config overrides given after options
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if debug or root not in OPTIONAL_EXTRAS:
            raise
        print(f"error: this command needs the optional package {root!r}: pip install 'multiway[{OPTIONAL_EXTRAS[root]}]'",
              file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {_message(e)} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    except SystemExit as e:  # raise SystemExit("message") in a command: a user error too
        if not isinstance(e.code, str):
            raise
        print(f"error: {_message(SystemExit(e.code))}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
