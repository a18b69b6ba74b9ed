"""The serving engine: models, admission, deadlines, cancellation and batching, with no HTTP in it.

Front ends (``service.app``'s HTTP routes, Ray Serve, the Python API, the corpus command) call one
``Engine`` and map its errors to what their callers see. See ``engine.engine``.

``Engine``, ``Admission``, ``Trace`` and ``deadline_in`` are imported on first use, so that importing the errors
(as the HTTP layer's error mapping does) loads nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import (
    DeadlineExceeded,
    EngineError,
    InputTooLarge,
    InvalidInput,
    ModelSwitchedOff,
    ModelUnavailable,
    Overloaded,
    ShuttingDown,
)

if TYPE_CHECKING:
    from engine.engine import Admission, Engine, Trace, deadline_in

__all__ = [
    "Admission",
    "DeadlineExceeded",
    "Engine",
    "EngineError",
    "InputTooLarge",
    "InvalidInput",
    "ModelSwitchedOff",
    "ModelUnavailable",
    "Overloaded",
    "ShuttingDown",
    "Trace",
    "deadline_in",
]


def __getattr__(name: str) -> Any:
    if name in ("Admission", "Engine", "Trace", "deadline_in"):
        from engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
