"""Log output: uvicorn's usual text, or JSON lines with WRENN_LOG_FORMAT=json (one object a line:
ts, level, logger, message, and exc for a traceback), for a fleet's log collectors."""

from __future__ import annotations

import copy
import json
import logging
import os
from datetime import datetime, timezone
from typing import Any

from uvicorn.config import LOGGING_CONFIG


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def json_logs() -> bool:
    return (os.environ.get("WRENN_LOG_FORMAT") or "").strip().lower() == "json"


def uvicorn_log_config() -> dict[str, Any]:
    """What to give uvicorn.run(log_config=...): its own config, or everything as JSON lines."""
    if not json_logs():
        return copy.deepcopy(LOGGING_CONFIG)
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "wrenn_control.logs.JsonFormatter"}},
        "handlers": {"json": handler},
        "root": {"handlers": ["json"], "level": "INFO"},
        "loggers": {name: {"handlers": [], "level": "INFO", "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
