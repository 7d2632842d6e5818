"""structlog set-up shared by both planes: one log entry per line on stderr, JSON or readable console lines.

Every line leaves in one write() call. print() writes the message and its newline in two
calls, so two processes sharing a stderr (`nanoplane serve` and its data plane child) could
put two entries on one line when their calls interleaved: A's entry, B's entry, A's newline.
Python's own `logging` (grpc, asyncio) goes through the same writer and lock, rendered the
same way, so every line of a JSON log parses.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import TextIO

import structlog

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
FORMAT_ENV = "NANOPLANE_LOG_FORMAT"
LEVEL_ENV = "NANOPLANE_LOG_LEVEL"
_DEFAULT_FORMAT = "auto"
_DEFAULT_LEVEL = "info"


class LineWriter:
    """Writes whole lines to a stream, each in one call, under one lock for every logger of the process."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lock = threading.Lock()

    def write_line(self, text: str) -> None:
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()


class LineLogger:
    """structlog's logger: what the processors rendered goes to the LineWriter."""

    def __init__(self, writer: LineWriter):
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.write_line(message)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


class _LineHandler(logging.Handler):
    """Python logging's records, rendered by structlog's renderer, through the same LineWriter."""

    def __init__(self, writer: LineWriter, formatter: logging.Formatter):
        super().__init__()
        self._writer = writer
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.write_line(self.format(record))
        except Exception:
            self.handleError(record)


def use_json(log_format: str, stream: TextIO) -> bool:
    """auto: console lines for a person at a terminal, JSON for a file, a pipe or a log collector."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty is not None and isatty())
    return log_format == "json"


def configure_logging(level: str | None = None, json: bool | None = None, log_format: str | None = None) -> None:
    """level and format default to NANOPLANE_LOG_LEVEL and NANOPLANE_LOG_FORMAT (auto | json | console)."""
    level = (level or os.environ.get(LEVEL_ENV, _DEFAULT_LEVEL)).upper()
    stream = sys.stderr
    if json is None:
        json = use_json(log_format or os.environ.get(FORMAT_ENV, _DEFAULT_FORMAT), stream)
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    shared = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    writer = LineWriter(stream)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, structlog.processors.format_exc_info,
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=lambda *args: LineLogger(writer),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared, structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer])
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LineHandler)]:
        root.removeHandler(handler)
    root.addHandler(_LineHandler(writer, formatter))
    root.setLevel(max(getattr(logging, level, logging.INFO), logging.WARNING))


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=os.environ.get(FORMAT_ENV, _DEFAULT_FORMAT),
                        help="auto (console lines when stderr is a terminal, else one JSON object per line), json "
                             f"or console [env {FORMAT_ENV}, default %(default)r]")
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower,
                        default=os.environ.get(LEVEL_ENV, _DEFAULT_LEVEL),
                        help=f"least severe level logged [env {LEVEL_ENV}, default %(default)r]")


def configure_logging_from_args(args: argparse.Namespace) -> None:
    """Also exports the choice, so that child processes (serve's data plane) log the same way."""
    os.environ[FORMAT_ENV] = args.log_format
    os.environ[LEVEL_ENV] = args.log_level
    configure_logging(args.log_level, log_format=args.log_format)
