"""Structured JSON logs, one object per line, never with secrets."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else came from `extra=` and is logged.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


# Secrets that could reach a log line through an error message: API keys
# ("ck_..." or after "Bearer"), and passwords in cloudinary:// or mysql:// URLs.
_SECRETS = (
    (re.compile(r"\bck_[A-Za-z0-9_-]{8,}"), "ck_***"),
    (re.compile(r"(?i)(bearer\s+)\S+"), r"\1***"),
    (
        re.compile(r"\b(cloudinary|mysql|mariadb|redis|rediss)://([^:/@\s]*):[^@\s]*@"),
        r"\1://\2:***@",
    ),
)


def redact(text: str) -> str:
    """The text with every API key and URL password replaced by ***."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


def setup(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
