"""The graph a bundle holds, as PyTorch modules: what is traced into ONNX (``export.onnx_export``)
and what the PyTorch runtime runs (``engine.runtimes``), and the model rebuilt from a bundle's
own weights. Both import it from here, downward: neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.config import IMMConfig
from model.modeling import IMMPreTrainedModel, build_task_model
from model.tasks import TASKS, task_spec

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "NERGraph", "REGraph", "graph_module", "rebuild_model"]


# Each task's graph signature, as its description (model.tasks) gives it.
class _GraphSignature(Mapping[str, tuple[str, ...]]):
    """Each task's graph input (or output) names, read from its ``TaskSpec`` at each lookup, so that
    a task registered later is known too."""

    def __init__(self, field: str):
        self._field = field

    def __getitem__(self, task: str) -> tuple[str, ...]:
        return getattr(task_spec(task), self._field)

    def __iter__(self) -> Iterator[str]:
        return iter(TASKS)

    def __len__(self) -> int:
        return len(TASKS)


INPUT_NAMES = _GraphSignature("graph_inputs")
OUTPUT_NAMES = _GraphSignature("graph_outputs")


class _Graph(nn.Module):
    """What a bundle's graph computes; ``visual=False`` leaves the visual stream out (the pictures
    are then ignored: for a model whose visual path was never trained, see ``visual_stream``)."""

    def __init__(self, model: IMMPreTrainedModel, visual: bool = True):
        super().__init__()
        self.model = model
        self.visual = visual

    def encode(self, input_ids, attention_mask, pixel_values, has_image) -> torch.Tensor:
        if not self.visual:
            return self.model.encoder.encode_text(input_ids, attention_mask).text
        return self.model.encoder(input_ids, attention_mask, pixel_values, has_image).text


class NERGraph(_Graph):
    """The NER graph: inputs in ``INPUT_NAMES["ner"]`` order, word emissions out (B, W, T)."""

    def forward(
        self, input_ids, attention_mask, word_index, word_shape, pixel_values, has_image
    ) -> torch.Tensor:
        return self.model.head.emissions(
            self.encode(input_ids, attention_mask, pixel_values, has_image), word_index, word_shape
        )


class REGraph(_Graph):
    """The RE graph: inputs in ``INPUT_NAMES["re"]`` order, relation logits out (B, R)."""

    def forward(self, input_ids, attention_mask, pixel_values, has_image, marker_index) -> torch.Tensor:
        return self.model.head(self.encode(input_ids, attention_mask, pixel_values, has_image), marker_index)


def graph_module(model: IMMPreTrainedModel, visual: bool = True) -> nn.Module:
    """The eval-mode wrapper that is traced into the graph (and that the PyTorch runtime runs)."""
    return task_spec(model.config.task).load("graph_wrapper")(model, visual).eval()


def rebuild_model(
    config: IMMConfig, graph: str | Path, weights: dict[str, dict[str, Any]]
) -> IMMPreTrainedModel:
    """The model of ``config`` holding the weights a bundle's graph has (``weights``: its manifest's
    table); parameters the graph never reads are zero. What the PyTorch runtime serves."""
    from export.weights import read_weights

    model = build_task_model(config).eval()
    with torch.no_grad():
        for parameter in model.state_dict().values():
            parameter.zero_()
    values = {key: torch.from_numpy(value) for key, value in read_weights(graph, weights).items()}
    unknown = set(values) - set(model.state_dict())
    if unknown:
        raise ValueError(
            f"the weights table names parameters this model does not have: {sorted(unknown)[:5]}"
        )
    model.load_state_dict(values, strict=False)
    return model
