"""What the ASGI layers of one request hand each other: one typed object in the request's scope.

The outer layers run before FastAPI (request id and access log, then the guard's deadline and
admission); the route and the error handlers read what they set. One ``RequestContext`` per request,
at ``scope["state"]["imm"]``, instead of loose keys, so that a misspelt key is an AttributeError,
not a silent ``None``.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine import Admission

_KEY = "imm"


@dataclass
class RequestContext:
    request_id: str | None = None
    # The guard's: the call's deadline (time.monotonic() seconds, None: the engine's default) and
    # its places in the models' queues, taken at the request's head.
    deadline: float | None = None
    admission: Admission | None = None
    # The form field a picture error names ("image", or "image_base64" in a JSON body).
    image_field: str = "image"
    # Details of the engine's call for the access log line (model, batch size, ...).
    log_extra: dict[str, Any] = field(default_factory=dict)


def request_context(scope: MutableMapping[str, Any]) -> RequestContext:
    """The request's context, made on first use."""
    state = scope.setdefault("state", {})
    context = state.get(_KEY)
    if context is None:
        context = state[_KEY] = RequestContext()
    return context
