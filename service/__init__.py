"""The IMM inference service: FastAPI on ONNX Runtime, torch-free.

``python -m service`` serves the bundles named by ``IMM_NER_BUNDLE`` / ``IMM_RE_BUNDLE``;
``create_app(settings)`` builds the app (tests, other servers). See docs/service.md.

Imports are lazy so that ``python -m service.healthcheck`` (run every few seconds by Docker)
loads the standard library only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.settings import Settings
    from service.app import create_app

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from service.app import create_app

        return create_app
    if name == "Settings":
        from engine.settings import Settings

        return Settings
    raise AttributeError(f"module 'service' has no attribute {name!r}")
