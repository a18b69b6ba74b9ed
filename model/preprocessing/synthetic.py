"""Synthetic pictures: photo-like JPEGs made from a seed, where no real picture may be used.

No tweet images ship with the project, so the tests, the benchmarks and the demo's screenshots use
these: smooth colour gradients plus Gaussian noise, which JPEG codes (and a decoder decodes) about as
hard as a photo of the same size. The same arguments give the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def synthetic_jpeg(
    width: int = 320, height: int = 240, *, seed: int = 0, quality: int = 90, noise: float = 20.0
) -> bytes:
    """A ``width`` x ``height`` photo-like JPEG: gradients plus noise of standard deviation ``noise``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
