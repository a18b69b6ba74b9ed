"""The image steps of ``model.preprocessing.image`` on torch tensors, for the GPU runtime.

With the PyTorch runtime on a GPU, a JPEG is decoded there by nvJPEG
(``torchvision.io.decode_jpeg(..., device="cuda")``, a whole batch per call) and resized and
normalised there too, so the server's CPU only parses the request. The steps are the CPU path's
(``ImageProcessor``): upright RGB (EXIF orientation applied), the whole picture resized to a
square with bicubic filtering, rounded to 8-bit levels, then CLIP-normalised.

The CPU path decodes JPEGs in draft mode (the decoder's own 1/2, 1/4 or 1/8 scaling) and lets
Pillow reduce by an integer factor before its bicubic filter (``reducing_gap=3``); nvJPEG decodes
at full size, so this path first averages blocks of the same factors (``_prefilter``), then
applies an antialiased bicubic filter. Not bit-identical: ``TOLERANCE`` states the bound measured
on photo-like pictures and on drawn ones with sharp edges (the worst case: the differences sit on
the edges), which tests/test_tensor_image.py checks. Without that prefilter the 99th percentile
was up to 0.27. Not imported by ``model.preprocessing`` (which stays torch-free): only the
PyTorch runtime uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TOLERANCE", "decode_jpegs", "nvjpeg_available", "resize_normalise"]

#: Largest differences to the CPU path allowed, in normalised units (one 8-bit level is about
#: 0.015 of them): the mean over all values, and the 99th percentile of the absolute difference.
TOLERANCE = {"mean_abs": 0.015, "p99_abs": 0.2}


def nvjpeg_available() -> bool:
    """Whether torchvision's JPEG decoder is importable (it decodes on the GPU with nvJPEG)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        return False
    return True


def decode_jpegs(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes to upright RGB uint8 tensors (3, H, W) on ``device``, in one batched call.

    ``None`` for a picture the decoder refused (CMYK, progressive on some versions, corrupt): the
    caller decodes those on the CPU, where Pillow either manages or names the problem.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in data]
    options = {"mode": ImageReadMode.RGB, "device": device, "apply_exif_orientation": True}
    try:
        return list(decode_jpeg(encoded, **options))
    except RuntimeError:  # one bad picture fails the batch: decode one by one to find it
        decoded: list[torch.Tensor | None] = []
        for item in encoded:
            try:
                decoded.append(decode_jpeg(item, **options))
            except RuntimeError:
                decoded.append(None)
        return decoded


def resize_normalise(
    images: Sequence[torch.Tensor],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 RGB tensors (3, H, W) of any sizes to the model's ``pixel_values`` (N, 3, size, size).

    ``out`` (N, 3, size, size), when given, receives the result (the runtime's static buffer).
    One resize per picture (their sizes differ); the normalisation runs once on the whole batch.
    """
    device = images[0].device if images else torch.device("cpu")
    if out is None:
        out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=device)
    for number, image in enumerate(images):
        resized = F.interpolate(
            _prefilter(image.unsqueeze(0).float(), size),
            size=(size, size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        out[number] = resized[0].round_().clamp_(0, 255)  # 8-bit levels, like Pillow's output
    shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    pixels = out[: len(images)]
    pixels.mul_(1.0 / 255.0).sub_(shift).div_(scale)
    return pixels


def _prefilter(image: torch.Tensor, size: int) -> torch.Tensor:
    """What the CPU path does before its bicubic filter: the JPEG draft's scaling (the largest of
    1/2, 1/4, 1/8 that keeps both sides >= ``size``), then Pillow's integer reduction while the
    picture is still 3x the target or more; both as block averages."""
    height, width = image.shape[-2:]
    draft = 1
    while draft < 8 and math.ceil(width / (2 * draft)) >= size and math.ceil(height / (2 * draft)) >= size:
        draft *= 2
    if draft > 1:
        image = F.avg_pool2d(image, draft, ceil_mode=True)
    reduce = min(image.shape[-1] // (3 * size), image.shape[-2] // (3 * size))
    if reduce > 1:
        image = F.avg_pool2d(image, reduce, ceil_mode=True)
    return image


def from_pil(image) -> torch.Tensor:
    """An RGB ``PIL.Image`` as a uint8 (3, H, W) tensor (the CPU fallback's decoded picture)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
