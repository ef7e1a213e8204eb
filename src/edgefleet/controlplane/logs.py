"""The server's logging: one logger per module (``edgefleet.controlplane.<module>``), written to stderr as text
for a person or as JSON lines for a log collector; uvicorn's own loggers go through the same handler.

Text: the message alone at ``info`` (what the server tells its operator: where the admin token is, the URL it
listens on, rollout transitions), ``<level>: <message>`` at every other level, then the traceback if any. Other
libraries' records (alembic's migration steps, ...) are written from ``warning`` on, all of them at ``debug``. JSON:
one object per line with ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and, for an exception,
``exc_info``."""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "TextFormatter", "configure", "logging_config"]

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno != logging.INFO:
            message = f"{record.levelname.lower()}: {message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def logging_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` document; uvicorn takes it as ``log_config`` and applies it again."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    lvl = level.upper()
    # Libraries below the server (alembic's migration steps, ...) speak up from warning on, unless debugging.
    others = lvl if level in ("debug", "error") else "WARNING"
    # uvicorn's loggers keep no handler of their own: they propagate to the root's, so every line has one format
    ours = {"handlers": [], "propagate": True, "level": lvl}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"edgefleet": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "edgefleet", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": others},
        "loggers": {name: dict(ours) for name in ("edgefleet", "uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def configure(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """Apply :func:`logging_config` now (the app logs while it is built, before uvicorn starts); returns it."""
    config = logging_config(level, fmt)
    logging.config.dictConfig(config)
    return config
