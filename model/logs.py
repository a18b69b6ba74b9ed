"""Log lines for people or for machines: ``configure("text" | "json")``. The server and training
write the same JSON lines (time, level, logger, message; a message that is a JSON object is merged
into the line, as the server's access log is)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

__all__ = ["JsonFormatter", "configure"]

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (tracebacks as a field)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        fields = None
        if message.startswith("{"):
            try:
                fields = json.loads(message)
            except ValueError:
                fields = None
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record comes, not the stream it was when the
    handler was made: a training run called from Python (a notebook, a test) may replace and close
    its stderr, and the root logger outlives the call."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(log_format: LogFormat = "text", level: int = logging.INFO) -> None:
    """The root logger on stderr, as text lines or JSON lines."""
    handler = StderrHandler()
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
