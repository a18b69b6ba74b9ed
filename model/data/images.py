"""Tweet images looked up by id in a directory (torch-free).

A missing or unreadable image is not an error: the example becomes a text-only one, as it
would be at serving time. The loader counts them, and the caller reports the count once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from model.preprocessing import ImageError, ImageProcessor

log = logging.getLogger(__name__)


class ImageStore:
    """Resolves image ids (file names) in ``directory``; ``None`` as directory means no images at all."""

    def __init__(self, directory: str | Path | None, processor: ImageProcessor):
        self.directory = Path(directory) if directory is not None else None
        self.processor = processor
        self._available: frozenset[str] = (
            frozenset(os.listdir(self.directory)) if self.directory else frozenset()
        )
        self.unreadable: set[str] = set()

    def path(self, image_id: str | None) -> Path | None:
        if self.directory is None or not image_id or image_id not in self._available:
            return None
        return self.directory / image_id

    def count_available(self, image_ids: Iterable[str | None]) -> int:
        return sum(1 for image_id in image_ids if self.path(image_id) is not None)

    def load(self, image_id: str | None) -> Image.Image | None:
        """The decoded, upright RGB picture, or None (missing or unreadable: counted)."""
        path = self.path(image_id)
        if path is None:
            return None
        try:
            return self.processor.load(path)
        except (ImageError, OSError) as error:
            if image_id not in self.unreadable:
                log.warning("unreadable image %s (used text-only): %s", path, error)
            self.unreadable.add(image_id)
            return None

    def report(self, image_ids: list[str | None], what: str) -> int:
        """Logs, once, how many examples of ``what`` go without an image; returns that count."""
        missing = len(image_ids) - self.count_available(image_ids)
        if self.directory is None:
            log.info("%s: no image directory given, all %d examples are text-only", what, len(image_ids))
        elif missing:
            log.warning(
                "%s: %d of %d examples have no image in %s; they are used text-only",
                what,
                missing,
                len(image_ids),
                self.directory,
            )
        return missing
