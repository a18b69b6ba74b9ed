"""The CLIP teacher of the SW loss: training only, never part of a checkpoint or a bundle.

Loaded from a local directory in transformers' ``CLIPModel`` format (``config.json``, weights,
tokenizer files), the same code for a real CLIP and for the tiny random one the tests save.
Images go through the project's own image preprocessing, at CLIP's resolution and statistics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.config import CLIP_MEAN, CLIP_STD
from model.preprocessing import ImageProcessor


class TeacherLoadError(ValueError):
    """The directory does not hold a usable CLIP model."""


class CLIPTeacher:
    """Sentence-level text and image embeddings ``T_c`` and ``V_c`` (paper eq. 5)."""

    def __init__(self, model, tokenizer, image_processor: ImageProcessor, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.max_text_len = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> CLIPTeacher:
        from transformers import AutoTokenizer, CLIPModel

        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise TeacherLoadError(
                f"--clip {directory}: no config.json (expected a transformers CLIPModel directory)"
            )
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        if model_type != "clip":
            raise TeacherLoadError(f"--clip {directory}: model_type is {model_type!r}, expected 'clip'")
        try:
            model = CLIPModel.from_pretrained(directory, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as error:
            raise TeacherLoadError(f"--clip {directory}: {error}") from None
        mean, std = CLIP_MEAN, CLIP_STD
        processor_path = directory / "preprocessor_config.json"
        if processor_path.is_file():
            processor = json.loads(processor_path.read_text(encoding="utf-8"))
            mean = tuple(processor.get("image_mean", mean))
            std = tuple(processor.get("image_std", std))
        image_processor = ImageProcessor(int(model.config.vision_config.image_size), mean, std)
        return cls(model, tokenizer, image_processor, device)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return _as_tensor(features).float().cpu()

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = np.stack([self.image_processor.to_array(image) for image in images])
        features = self.model.get_image_features(pixel_values=torch.from_numpy(pixels).to(self.device))
        return _as_tensor(features).float().cpu()


def _as_tensor(features) -> torch.Tensor:
    """transformers 4 returns the projected embeddings; 5 may wrap them in an output object."""
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output
