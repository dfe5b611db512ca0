"""Logging for people (``text``) or machines (``json``: one object per line), set up in one place.

Used by ``guardproxy serve`` for the single process and, as uvicorn's ``log_config``, in every
worker. A record's ``extra`` fields (the pipeline's ``call settled`` line carries tenant, models,
tokens, cost, outcome, request and job id, duration) become keys of its JSON object; the text line
says the same in its message. Per-request access lines (uvicorn) and httpx's ``HTTP Request``
lines are off by default. The settled line of each call (``guardproxy.observe.calls``) is on by default in
``json`` and off in ``text`` (``server.log_calls`` / ``--log-calls`` decide): the audit log in the
store already holds every call, and a line per call is a sizeable share of a request's CPU.
"""

from __future__ import annotations

import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

import orjson

FORMATS = ("text", "json")
#: The settled line of each call (tenant, models, tokens, cost, outcome, ids) is logged here.
CALLS_LOGGER = "guardproxy.calls"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# uvicorn adds a coloured copy of its message for its own formatter.
_DROPPED = frozenset({"color_message"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the ``extra`` fields, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _DROPPED and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def log_config(
    log_format: str = "text", level: str = "info", access_log: bool = False, log_calls: bool | None = None,
) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document (also uvicorn's ``log_config``). ``log_calls``: the
    settled line of every call (``guardproxy.observe.calls``); ``None``: on for ``json``, off for ``text``."""
    calls = log_format == "json" if log_calls is None else log_calls
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    formatter: dict[str, Any] = (
        {"()": "guardproxy.observe.logs.JsonFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    quiet = {"level": "WARNING", "handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "INFO" if access_log else "WARNING", "handlers": [], "propagate": True},
            # One "HTTP Request: POST ..." line per upstream call: the settled line says it better.
            "httpx": quiet,
            "httpcore": quiet,
            CALLS_LOGGER: {"level": level.upper() if calls else "WARNING", "handlers": [], "propagate": True},
        },
    }


def configure(
    log_format: str = "text", level: str = "info", access_log: bool = False, log_calls: bool | None = None,
) -> None:
    logging.config.dictConfig(log_config(log_format, level, access_log, log_calls))
