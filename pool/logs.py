"""Logging of `pool serve`: human lines or JSON lines on stderr, and a size-capped log file.

Structured fields travel as `extra={"event": ..., ...}`: JSON lines carry them as keys, human
lines show the message alone (which already says the same in words).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

import orjson

from pool import config

HUMAN_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"t": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "pid": record.process, "message": record.getMessage()}
        doc.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def setup_logging(as_json: bool, log_file: Path | None = None) -> None:
    """INFO to stderr, and to `log_file` (rotated at LOG_FILE_MAX_BYTES) when given."""
    formatter: logging.Formatter = (JsonLogFormatter() if as_json
                                    else logging.Formatter(HUMAN_FORMAT))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handlers.append(logging.handlers.RotatingFileHandler(
            log_file, maxBytes=config.LOG_FILE_MAX_BYTES, backupCount=config.LOG_FILE_BACKUPS,
            encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    if log_file is not None:
        os.chmod(log_file, 0o600)
