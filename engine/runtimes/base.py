"""The interface between the server's pipelines and whatever runs a bundle's model.

``Runtime.infer(texts, pictures)`` takes a batch of encoded texts and their pictures and returns the
task's decoded output (``export.outputs``: ``NEROutput`` for NER, relation probabilities for RE).
A picture is normalised pixels, or an ``UndecodedJpeg`` (JPEG bytes whose header was checked) for a
runtime that decodes on its device.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from export.bundle import Bundle
from export.outputs import NEROutput
from model.preprocessing import EncodedText, Preprocessor

__all__ = ["UndecodedJpeg", "NEROutput", "ModelPicture", "Runtime", "jpeg_header"]


@dataclass(frozen=True)
class UndecodedJpeg:
    """A JPEG left undecoded for a runtime that decodes on its device (its header was checked)."""

    data: bytes
    width: int
    height: int


#: A picture as the pipeline hands it to a runtime: normalised pixels (3, S, S), or JPEG bytes.
ModelPicture = np.ndarray | UndecodedJpeg


class Runtime(ABC):
    """Runs one bundle's model; called from the model's inference threads (several at once only where
    ``concurrent_calls``)."""

    #: Whether ``infer`` takes ``UndecodedJpeg`` JPEGs (decoding them on its device).
    decodes_jpeg: bool = False
    #: Whether ``infer`` may run in several threads at once.
    concurrent_calls: bool = False

    def __init__(self, bundle: Bundle, preprocessor: Preprocessor):
        self.bundle = bundle
        self.preprocessor = preprocessor
        self.task = bundle.task

    @property
    @abstractmethod
    def provider(self) -> str:
        """What runs the model, as reported in /ready and imm_model_info."""

    @abstractmethod
    def infer(
        self, texts: Sequence[EncodedText], images: Sequence[ModelPicture | None]
    ) -> NEROutput | np.ndarray:
        """NER: ``NEROutput``; RE: relation probabilities (B, R) float64."""


def jpeg_header(data: bytes, max_pixels: int) -> UndecodedJpeg | None:
    """An ``UndecodedJpeg`` for JPEG bytes whose header is sane and within ``max_pixels``, else None
    (the caller then takes the CPU path, which decodes what it can and names any problem)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):  # CMYK and others: Pillow's
                return None
    except Exception:  # noqa: BLE001 - whatever Pillow refuses is the CPU path's to report
        return None
    if width * height > max_pixels:
        return None
    return UndecodedJpeg(data, width, height)
