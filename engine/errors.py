"""The engine's own errors: what went wrong with a request, in words, with no HTTP in them.

Front ends map them: the HTTP layer (``service.errors``) to status codes, the Python API and the
corpus command raise or record them as they are. Picture errors come from the shared
preprocessing (``model.preprocessing.ImageError``: ``NotAnImage``, ``ImageTooLarge``,
``CorruptImage``) and are raised unchanged.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors a request can get from the engine."""


class InvalidInput(EngineError):
    """A field of the request is wrong (HTTP: 422 naming the field)."""

    def __init__(self, field: str, message: str, kind: str = "value_error"):
        super().__init__(message)
        self.field = field
        self.message = message
        self.kind = kind


class InputTooLarge(EngineError):
    """The request asks for more than a limit allows: text length, entity pairs (HTTP: 413)."""


class ModelUnavailable(EngineError):
    """A model the request needs is not loaded (HTTP: 503; with ``loading``, worth retrying soon)."""

    def __init__(self, message: str, loading: bool = False):
        super().__init__(message)
        self.loading = loading


class ModelSwitchedOff(ModelUnavailable):
    """A model the request needs is switched off by the settings (its bundle setting is empty): a
    retry cannot help (HTTP: 404 naming the setting)."""


class Overloaded(EngineError):
    """Refused at once: the model's queue cannot take the request, or could not answer it before its
    deadline (HTTP: 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    """The request's deadline passed, or would pass, before its answer (HTTP: 504)."""


class ShuttingDown(EngineError):
    """The engine is closing: requests still waiting are not answered (HTTP: 503)."""
