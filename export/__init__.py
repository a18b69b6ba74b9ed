"""Checkpoint to ONNX serving bundle (``python -m export``), and reading bundles without torch.

``export.bundle`` (manifest, ``load_bundle``) is torch-free and is what the server imports;
``export_bundle`` lives in ``export.onnx_export`` with the torch side and is imported lazily, so
``import export`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from export.bundle import MANIFEST_FILE, Bundle, BundleError, load_bundle
from export.checks import ExportError

if TYPE_CHECKING:
    from export.onnx_export import export_bundle

__all__ = ["MANIFEST_FILE", "Bundle", "BundleError", "ExportError", "export_bundle", "load_bundle"]


def __getattr__(name: str) -> Any:
    if name == "export_bundle":
        from export.onnx_export import export_bundle

        return export_bundle
    raise AttributeError(f"module 'export' has no attribute {name!r}")
