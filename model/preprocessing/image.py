"""Image decoding and normalisation (numpy and Pillow only).

Every image a model sees, in training, export checks and serving, goes through
``ImageProcessor``: decode (JPEG in draft mode, so a 4000 px photo is decoded at a fraction of
its size), EXIF orientation, RGB, a square resize of the whole picture (no crop: a tweet's
entities may sit at its edges) and CLIP normalisation, in CHW float32.

Memory. A file of a few KB can declare 25 million pixels. Past the decoder's own buffer (which
formats other than JPEG cannot shrink), no full-size copy is ever made: a picture that needs a
mode conversion (16-bit grey, palette, transparency, CMYK, ...) and is larger than twice the
target is converted stripe by stripe and reduced (box filter, an integer factor) as it goes, with
integer arithmetic; the EXIF orientation is applied in place, or to the reduced picture. And the
decoders' buffers are bounded across threads: ``ImageProcessor`` decodes within
``DECODE_BUDGET`` (at most ``DECODE_BUDGET_BYTES`` of decoded pixels at once; a larger picture
decodes alone), so four 25-megapixel pictures at once cost one decoder buffer, not four.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: far above any phone photo, far below a decompression bomb


class ImageError(ValueError):
    """An input that cannot become an image; subclasses say why."""


class NotAnImage(ImageError):
    """The bytes are not an image format Pillow knows."""


class CorruptImage(ImageError):
    """A known format whose data is truncated or damaged."""


class ImageTooLarge(ImageError):
    """The declared pixel count exceeds the limit (decompression bombs included)."""


#: Decoded pixels held at once by ``ImageProcessor`` across threads (see ``DecodeBudget``).
DECODE_BUDGET_BYTES = 64 * 1024 * 1024
#: Rows converted at a time when a large picture changes mode (a multiple of the reduction factor).
_STRIPE_ROWS = 64
# Bytes per pixel of Pillow's in-memory modes: one byte for 1/L/P, two for 16-bit grey, else four
# (Pillow stores every multi-band 8-bit mode in 32 bits per pixel).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_MODES_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_DEEP_GREY = ("I;16", "I;16B", "I;16L", "I")  # 16- and 32-bit grey


def decoded_bytes(image: Image.Image) -> int:
    """The size of ``image``'s pixels once decoded, from its header (after ``draft``)."""
    width, height = image.size
    return width * height * _PIXEL_BYTES.get(image.mode, 4)


class DecodeBudget:
    """A process-wide bound on decoded pixels in memory: threads wait until their picture fits.

    A picture larger than the whole budget is let through when nothing else is decoding, so any
    picture within the pixel limit is served, one at a time.
    """

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self.used == 0 or self.used + size <= self.capacity)
            self.used += size
        try:
            yield
        finally:
            with self._changed:
                self.used -= size
                self._changed.notify_all()


DECODE_BUDGET = DecodeBudget(DECODE_BUDGET_BYTES)

# Pillow allocates pixels in blocks of this size through malloc (Image.core.get_block_size()).
_PILLOW_BLOCK_BYTES = 16 * 1024 * 1024


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_freed_memory() -> None:
    """Hands memory freed by a large decode back to the system.

    glibc keeps the blocks a thread frees in that thread's arena for its next allocations, so the
    threads of a pool that decode large pictures in turn would each keep a picture's worth of
    memory (measured: four 25-megapixel 16-bit PNGs on four threads, 200 MB kept instead of 50).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def open_image(
    source: bytes | str | Path, *, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
):
    """Decode ``source`` into an upright RGB ``PIL.Image``.

    The pixel limit is checked on the header, before any pixel is decoded. ``draft_size`` lets the
    JPEG decoder scale down by 1/2, 1/4 or 1/8 while staying at least that large, and a picture in
    another mode than RGB be reduced by an integer factor while staying at least that large.
    """
    return decode(open_header(source, draft_size=draft_size, max_pixels=max_pixels), draft_size)


def open_header(
    source: bytes | str | Path, *, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """The picture with only its header read (size, mode), the pixel limit checked and the JPEG
    draft mode set: nothing decoded yet (``decode`` does that)."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        # No warnings filter here (not thread-safe): Pillow's own bomb error fires beyond 2x its
        # limit, and ``max_pixels`` below is checked on the header before anything is decoded.
        image = Image.open(stream)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"image is too large: {error}") from None
    except UnidentifiedImageError:
        raise NotAnImage("not an image file (unsupported or unknown format)") from None
    except OSError as error:
        raise CorruptImage(f"image could not be read: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image has {width}x{height} pixels, more than the limit of {max_pixels}")
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
    except (OSError, SyntaxError, ValueError) as error:
        raise CorruptImage(f"image data is corrupt or truncated: {error}") from None
    return image


def decode(image: Image.Image, draft_size: int | None = None) -> Image.Image:
    """``open_header``'s picture decoded, upright and RGB (reduced to at least ``draft_size`` when it
    needs a mode conversion: see the module's docstring)."""
    try:
        image.load()
        factor = min(image.size) // draft_size if draft_size else 1
        if image.mode == "RGB" or factor < 2:
            ImageOps.exif_transpose(image, in_place=True)  # in place: no full-size copy
            return to_rgb(image)
        reduced = _reduced_rgb(image, factor)
        reduced.info = dict(image.info)  # the EXIF orientation
        ImageOps.exif_transpose(reduced, in_place=True)
        return reduced
    except (OSError, SyntaxError, ValueError) as error:  # Pillow reports truncated data as OSError
        raise CorruptImage(f"image data is corrupt or truncated: {error}") from None


def _reduced_rgb(image: Image.Image, factor: int) -> Image.Image:
    """``to_rgb(image).reduce(factor)``, converted ``_STRIPE_ROWS`` rows at a time (the same pixels:
    the stripes hold whole blocks of the box filter)."""
    width, height = image.size
    peak = _peak(image)
    reduced = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, _STRIPE_ROWS // factor)
    for top in range(0, height, rows):
        stripe = to_rgb(image.crop((0, top, width, min(top + rows, height))), peak=peak)
        reduced.paste(stripe.reduce(factor), (0, top // factor))
    return reduced


def _peak(image: Image.Image) -> int:
    """The largest value of a 16/32-bit grey picture (its white), from Pillow's extrema: no copy."""
    if image.mode not in _DEEP_GREY:
        return 255
    return max(int(image.getextrema()[1]), 1)


def to_rgb(image: Image.Image, peak: int | None = None) -> Image.Image:
    """RGB from any mode; transparency is composited on white (how the picture looks on the web).

    16/32-bit grey is rescaled to 8 bits (``value * 255 // peak``, integers) before the RGB
    conversion clips it; ``peak`` is the picture's largest value (given when ``image`` is a stripe).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _MODES_WITH_ALPHA:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _DEEP_GREY:
        peak = peak or _peak(image)
        values = np.asarray(image)
        if values.dtype.itemsize <= 2:  # 16-bit: one table lookup per pixel, no wider copy
            grey = _sixteen_bit_table(peak)[values]
        else:
            grey = (np.clip(values, 0, peak).astype(np.int64) * 255 // peak).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    return image.convert("RGB")


@functools.lru_cache(maxsize=8)
def _sixteen_bit_table(peak: int) -> np.ndarray:
    """The 8-bit level of every 16-bit value: ``min(value, peak) * 255 // peak``."""
    levels = np.minimum(np.arange(65536, dtype=np.uint32), peak)
    return (levels * 255 // peak).astype(np.uint8)


@dataclass(frozen=True)
class ImageProcessor:
    """Turns image bytes (or a path) into the model's ``pixel_values`` for one example."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int = DEFAULT_MAX_PIXELS

    def load(self, source: bytes | str | Path) -> Image.Image:
        return open_image(source, draft_size=self.image_size, max_pixels=self.max_pixels)

    def header(self, source: bytes | str | Path) -> Image.Image:
        """``open_header`` with this processor's limits: size and mode, nothing decoded."""
        return open_header(source, draft_size=self.image_size, max_pixels=self.max_pixels)

    def to_array(self, image: Image.Image) -> np.ndarray:
        size = (self.image_size, self.image_size)
        pixels = np.asarray(image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0))
        array = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._normalised[channel], pixels[..., channel], out=array[channel])
        return array

    @cached_property
    def _normalised(self) -> np.ndarray:
        """(3, 256): each channel's normalised value of every 8-bit level.

        A table lookup per pixel instead of float arithmetic on the whole array: the same float32
        operations, so bit-identical values, at less than half the cost (1.9 -> 0.8 ms per image).
        """
        levels = np.arange(256, dtype=np.float32)[None, :] * np.float32(1.0 / 255.0)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        return np.ascontiguousarray((levels - mean) / std)

    def __call__(self, source: bytes | str | Path) -> np.ndarray:
        """The model's pixels for ``source``, decoded within ``DECODE_BUDGET``."""
        image = self.header(source)
        size = decoded_bytes(image)
        with DECODE_BUDGET.reserve(size):
            picture = decode(image, self.image_size)
            try:
                return self.to_array(picture)
            finally:
                picture.close()  # the decoder's buffer goes now, not when the garbage collector runs
                image.close()
                if size > _PILLOW_BLOCK_BYTES:
                    release_freed_memory()


def augment(image: Image.Image, rng: np.random.Generator, min_scale: float = 0.6) -> Image.Image:
    """The view the SW word-level loss aligns: a random crop (60-100% of the area) and a random flip."""
    width, height = image.size
    scale = rng.uniform(min_scale, 1.0)
    crop_w = max(1, int(round(width * np.sqrt(scale))))
    crop_h = max(1, int(round(height * np.sqrt(scale))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    view = image.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view
