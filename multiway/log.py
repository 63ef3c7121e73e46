"""The ``multiway`` logger and progress bars.

* :func:`get_logger` returns ``logging.getLogger("multiway")`` (or a child, ``get_logger(__name__)``) with one
  handler that writes through ``tqdm.write``, so messages never break a progress bar. It is rank-aware: on a
  rank other than 0 (``torch.distributed`` rank, else the ``RANK`` environment variable) only warnings and errors
  are shown, unless ``MULTIWAY_LOG_ALL_RANKS=1``. ``MULTIWAY_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING`` ...)
  sets the level; the default is ``INFO``.
* :func:`progress` is ``tqdm`` that stays quiet in log files: when its output is not a terminal it prints one
  plain line (no carriage returns) at most every ``MULTIWAY_PROGRESS_INTERVAL`` seconds (default 30) instead of
  redrawing the bar every step. Bars are shown on rank 0 only.

Messages propagate to the root logger as usual (pytest's ``caplog`` sees them); an application that configures
the root logger itself and does not want them twice can set ``logging.getLogger("multiway").propagate = False``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

LOGGER_NAME = "multiway"
_HANDLER_NAME = "multiway-tqdm"
DEFAULT_PROGRESS_INTERVAL = 30.0  # seconds between progress lines when the output is not a terminal


def process_rank() -> int:
    """This process's rank: ``torch.distributed``'s when it is initialised, else ``$RANK`` (torchrun), else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # a torch build without distributed support
        pass
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


class _RankFilter(logging.Filter):
    """Below WARNING, only rank 0 speaks (unless MULTIWAY_LOG_ALL_RANKS=1)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or os.environ.get("MULTIWAY_LOG_ALL_RANKS", "") not in ("", "0"):
            return True
        return process_rank() == 0


class TqdmHandler(logging.Handler):
    """Writes records with ``tqdm.write`` (to stderr), which moves active progress bars out of the way."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a logging handler must never raise
            self.handleError(record)


def _configure(logger: logging.Logger) -> None:
    if any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        return
    handler = TqdmHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("[multiway] %(message)s"))
    handler.addFilter(_RankFilter())
    logger.addHandler(handler)
    level = logging.getLevelName(os.environ.get("MULTIWAY_LOG_LEVEL", "INFO").upper())  # a number for known names
    logger.setLevel(level if isinstance(level, int) else logging.INFO)


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``multiway`` logger, or its child ``name`` (``get_logger(__name__)`` in a module of the package)."""
    _configure(logging.getLogger(LOGGER_NAME))
    if name is None or name == LOGGER_NAME:
        return logging.getLogger(LOGGER_NAME)
    return logging.getLogger(name if name.startswith(f"{LOGGER_NAME}.") else f"{LOGGER_NAME}.{name}")


class _LineWriter:
    """A file wrapper for tqdm on a non-terminal: each redraw becomes one plain line (carriage returns dropped)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip("\n")
        if line.strip():
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_interval() -> float:
    """Seconds between progress lines on a non-terminal (``MULTIWAY_PROGRESS_INTERVAL``, default 30)."""
    text = os.environ.get("MULTIWAY_PROGRESS_INTERVAL", "")
    try:
        return float(text) if text else DEFAULT_PROGRESS_INTERVAL
    except ValueError:
        raise ValueError(f"MULTIWAY_PROGRESS_INTERVAL={text!r}: expected a number of seconds") from None


def progress(iterable: Iterable | None = None, *, file: IO[str] | None = None, disable: bool | None = None,
             **kwargs: Any) -> tqdm:
    """A ``tqdm`` progress bar (same arguments) that prints a plain line at most every
    :func:`progress_interval` seconds when ``file`` (default stderr) is not a terminal, and is off on ranks
    other than 0 unless ``disable=False`` is given."""
    stream = file if file is not None else sys.stderr
    if disable is None:
        disable = process_rank() != 0
    if not _is_terminal(stream):
        # a caller's mininterval is meant for a terminal; a log file gets at least the configured interval
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.0), progress_interval())
        kwargs["maxinterval"] = max(kwargs.get("maxinterval", 10.0), kwargs["mininterval"])
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ascii", True)
        stream = _LineWriter(stream)
    return tqdm(iterable, file=stream, disable=disable, **kwargs)


__all__ = ["LOGGER_NAME", "TqdmHandler", "get_logger", "process_rank", "progress", "progress_interval"]
