"""The one preprocessing path of the project: training, export and the server all call it.

Torch-free (numpy, Pillow, tokenizers), so the server imports it without PyTorch. ``Preprocessor``
bundles the text encoder and the image processor built from a model's ``PreprocessingConfig``;
``collate`` pads a list of examples into the arrays that are the model's (and the ONNX graph's)
inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from model.config import PreprocessingConfig
from model.preprocessing.image import (
    DEFAULT_MAX_PIXELS,
    CorruptImage,
    ImageError,
    ImageProcessor,
    ImageTooLarge,
    NotAnImage,
    augment,
    open_image,
)
from model.preprocessing.text import (
    WORD_SHAPES,
    EncodedText,
    TextEncoder,
    add_entity_markers,
    load_tokenizer,
    word_shape,
)
from model.preprocessing.words import split_words

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CorruptImage",
    "EncodedText",
    "ImageError",
    "ImageProcessor",
    "ImageTooLarge",
    "NotAnImage",
    "Preprocessor",
    "TOKENIZER_FILE",
    "WORD_SHAPES",
    "TextEncoder",
    "add_entity_markers",
    "augment",
    "collate",
    "load_tokenizer",
    "open_image",
    "split_words",
    "word_shape",
]

TOKENIZER_FILE = "tokenizer.json"


class Preprocessor:
    """Text and image preprocessing of one model, rebuilt from its config and tokenizer."""

    def __init__(
        self, config: PreprocessingConfig, tokenizer: Tokenizer, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.config = config
        self.text = TextEncoder(tokenizer, config)
        self.image = ImageProcessor(config.image_size, config.image_mean, config.image_std, max_pixels)

    @classmethod
    def from_directory(cls, directory: str | Path, config: PreprocessingConfig, **kwargs) -> Preprocessor:
        """From a checkpoint or bundle directory holding ``tokenizer.json``."""
        return cls(config, load_tokenizer(Path(directory) / TOKENIZER_FILE), **kwargs)

    def collate(
        self, texts: Sequence[EncodedText], images: Sequence[np.ndarray | None]
    ) -> dict[str, np.ndarray]:
        return collate(texts, images, pad_id=self.text.pad_id, image_size=self.config.image_size)


def collate(
    texts: Sequence[EncodedText], images: Sequence[np.ndarray | None], *, pad_id: int, image_size: int
) -> dict[str, np.ndarray]:
    """Pads a batch. The keys are the model's input names, shared with the ONNX graph.

    ``has_image`` (B,) marks the examples with a picture and ``pixel_values`` (N, 3, H, W) holds
    those N pictures only, in batch order (N may be 0): the visual stream runs on the pictures
    there are, so a text-only example costs the same alone or beside image examples in a batch.
    """
    if len(texts) != len(images) or not texts:
        raise ValueError("collate needs one image slot (or None) per text, and at least one example")
    batch = len(texts)
    seq_len = max(len(t.input_ids) for t in texts)
    num_words = max(t.num_words for t in texts)
    input_ids = np.full((batch, seq_len), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, seq_len), dtype=np.int64)
    word_index = np.zeros((batch, num_words), dtype=np.int64)
    shapes = np.zeros((batch, num_words), dtype=np.int64)
    word_mask = np.zeros((batch, num_words), dtype=bool)
    has_image = np.array([image is not None for image in images], dtype=bool)
    pixel_values = np.zeros((int(has_image.sum()), 3, image_size, image_size), dtype=np.float32)
    for row, text in enumerate(texts):
        input_ids[row, : len(text.input_ids)] = text.input_ids
        attention_mask[row, : len(text.input_ids)] = 1
        word_index[row, : text.num_words] = text.word_index
        if text.word_shape is not None:
            shapes[row, : text.num_words] = text.word_shape
        word_mask[row, : text.num_words] = True
    pictures = [image for image in images if image is not None]
    for number, image in enumerate(pictures):
        pixel_values[number] = image
    arrays = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "word_index": word_index,
        "word_shape": shapes,
        "word_mask": word_mask,
        "pixel_values": pixel_values,
        "has_image": has_image,
    }
    if all(t.marker_index is not None for t in texts):
        arrays["marker_index"] = np.stack([t.marker_index for t in texts])
    return arrays
