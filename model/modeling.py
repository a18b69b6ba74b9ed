"""The IMM model: patch projection, ISA blocks, IA blocks, and a task head.

Structure (paper Figure 2)::

    text ids ----> TextEmbeddings --+                     +--> IA blocks (text FFN gets --> head
                                    +--> ISA blocks ------+    selected visual knowledge)
    image -------> PatchEmbeddings -+    (shared LN/MHA,       (visual stream continues)
                                          per-modality FFN)

``IMMEncoder`` is shared by the two task models (``IMMForNER``, ``IMMForRE``), which follow one
contract: ``forward(**batch)`` returns an :class:`IMMOutput` whose ``loss`` is set when labels are
given, and ``predict(**batch)`` returns label names. A model rebuilds from its config alone
(``build_task_model``, the one place models are built); ``from_backbone`` loads a BERT-family
checkpoint's weights into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import IMMConfig
from model.distillation_loss import ner_distillation_loss, re_distillation_loss
from model.embeddings import PatchEmbeddings, TextEmbeddings
from model.heads import NERHead, REHead, gather_positions
from model.ia import IALayer, rows_of_pictures
from model.isa import ISALayer, attention_bias
from model.sw_loss import SWLossOutput, sw_loss, teacher_targets
from model.tasks import task_spec

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class EncoderOutput:
    text: torch.Tensor  # (B, L, d) after the last block
    isa_text: torch.Tensor  # (B, L, d) after the last ISA block (SW inputs)
    # (N, m + 1, d) of the N pictures (None when there were none); joint attention keeps one row
    # per example instead, (B, m + 1, d), and says so in ``visual_per_example``: picking the rows
    # that have a picture needs their count on the host, which a CUDA graph cannot wait for.
    isa_visual: torch.Tensor | None
    isa_visual_augmented: torch.Tensor | None  # the augmented views', laid out like isa_visual
    visual_per_example: bool = False


@dataclass
class IMMOutput:
    logits: torch.Tensor  # NER: word emissions (B, W, T); RE: relation logits (B, R)
    # gamma * L_SW + delta * L_task (eqs. 25-26); with soft targets (distillation, weight A):
    # gamma * L_SW + (1 - A) * delta * L_task + A * L_distill
    loss: torch.Tensor | None = None
    task_loss: torch.Tensor | None = None
    sw: SWLossOutput | None = None
    distillation: torch.Tensor | None = None


class IMMEncoder(nn.Module):
    """Text ids (B, L) and the batch's N pictures to text states (B, L, d).

    Input contract (shared with ``model.preprocessing.collate`` and the ONNX graph):
    ``pixel_values`` (N, 3, H, W) holds the pictures of the examples whose ``has_image`` (B,) is
    set, in batch order; N may be 0. The visual stream therefore costs nothing for text-only
    examples, in training, in a mixed serving batch and in an exported graph alike.
    """

    def __init__(self, config: IMMConfig):
        super().__init__()
        self.config = config
        self.text_embeddings = TextEmbeddings(config)
        self.patch_embeddings = PatchEmbeddings(config)
        self.isa_layers = nn.ModuleList(ISALayer(config) for _ in range(config.num_isa_layers))
        self.ia_layers = nn.ModuleList(IALayer(config) for _ in range(config.num_ia_layers))

    def _isa(self, text, text_bias, visual, visual_bias):
        for layer in self.isa_layers:
            text, visual = layer(text, text_bias, visual, visual_bias)
        return text, visual

    def _text_only(self, pixel_values: torch.Tensor) -> bool:
        """Whether the IA selection can be skipped: separate streams and no picture in the batch.

        The text output is then exactly what the full computation gives (IA adds nothing without
        an image). While exporting or tracing, the full graph is always built, since the number
        of pictures is an input's dynamic axis there.
        """
        exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()
        return not exporting and self.config.attention_mode == "separate" and pixel_values.shape[0] == 0

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        """The text stream alone: what ``forward`` gives the text when no example has a picture
        (separate attention), and the whole graph of a bundle whose visual path was never trained."""
        text = self.text_embeddings(input_ids)
        text_bias = attention_bias(attention_mask, text.dtype)
        for layer in self.isa_layers:
            text = layer.text_only(text, text_bias)
        isa_text = text
        for layer in self.ia_layers:
            text = layer.text_only(text, text_bias)
        return EncoderOutput(text=text, isa_text=isa_text, isa_visual=None, isa_visual_augmented=None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
        augmented_pixel_values: torch.Tensor | None = None,
    ) -> EncoderOutput:
        if self._text_only(pixel_values):
            return self.encode_text(input_ids, attention_mask)
        text_embeddings = self.text_embeddings(input_ids)
        text_bias = attention_bias(attention_mask, text_embeddings.dtype)
        # Row r of the batch reads picture picture_row[r] - 1; 0 is a zero picture for the rest.
        picture_row = torch.cumsum(has_image.long(), dim=0) * has_image.long()
        joint = self.config.attention_mode == "joint"

        def visual_stream(pixels: torch.Tensor) -> torch.Tensor:
            visual = self.patch_embeddings(pixels)
            # Joint attention needs each example's own visual tokens beside its text: one per row.
            return rows_of_pictures(visual, picture_row) if joint else visual

        # Separate streams: the patches of a picture attend to each other, unmasked. (With an
        # all-keep mask ONNX Runtime fuses that attention too, but its fused kernel dies with a
        # floating-point exception on a batch without pictures.)
        visual_bias = None
        if joint:  # text must not see the zero "image" of a text-only example
            keep = has_image[:, None].expand(-1, self.config.num_patches + 1)
            visual_bias = attention_bias(keep, text_embeddings.dtype)
        isa_text, isa_visual = self._isa(text_embeddings, text_bias, visual_stream(pixel_values), visual_bias)
        augmented = None
        if augmented_pixel_values is not None:
            _, augmented = self._isa(
                text_embeddings, text_bias, visual_stream(augmented_pixel_values), visual_bias
            )
        text, visual = isa_text, isa_visual
        # IA's inserted slots: the real tokens of the examples with a picture (eq. 21).
        slot_mask = attention_mask.bool() & has_image.bool()[:, None]
        for number, layer in enumerate(self.ia_layers):
            last = number == len(self.ia_layers) - 1
            text, visual = layer(
                text,
                text_bias,
                visual,
                visual_bias,
                slot_mask,
                None if joint else picture_row,
                compute_visual=not last,
            )
        return EncoderOutput(
            text=text,
            isa_text=isa_text,
            isa_visual=isa_visual,
            isa_visual_augmented=augmented,
            visual_per_example=joint,
        )

    def load_backbone_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copies a BERT checkpoint's weights in: embeddings, then layer i into block i (ISA first, then IA).

        Each BERT FFN initialises both the text and the visual FFN of its block; the patch
        embeddings' LayerNorm and type vector start from the text embeddings' LayerNorm and
        token type 1. Entity-marker rows added to the vocabulary start at the mean embedding.
        """
        state = _normalise_bert_keys(state)
        text = self.text_embeddings
        with torch.no_grad():
            words = state["embeddings.word_embeddings.weight"]
            text.word_embeddings.weight[: words.shape[0]] = words
            text.word_embeddings.weight[words.shape[0] :] = words.mean(dim=0)
            text.position_embeddings.weight.copy_(state["embeddings.position_embeddings.weight"])
            types = state["embeddings.token_type_embeddings.weight"]
            text.token_type_embeddings.weight.copy_(types)
            _copy_linear_like(text.LayerNorm, state, "embeddings.LayerNorm")
            _copy_linear_like(self.patch_embeddings.LayerNorm, state, "embeddings.LayerNorm")
            self.patch_embeddings.type_embedding.copy_(types[min(1, types.shape[0] - 1)].view(1, 1, -1))
            for number, block in enumerate([*self.isa_layers, *self.ia_layers]):
                prefix = f"encoder.layer.{number}"
                attention = block.attention
                _copy_linear_like(attention.query, state, f"{prefix}.attention.self.query")
                _copy_linear_like(attention.key, state, f"{prefix}.attention.self.key")
                _copy_linear_like(attention.value, state, f"{prefix}.attention.self.value")
                _copy_linear_like(attention.output, state, f"{prefix}.attention.output.dense")
                _copy_linear_like(attention.LayerNorm, state, f"{prefix}.attention.output.LayerNorm")
                for ffn in (block.text_ffn, block.visual_ffn):
                    _copy_linear_like(ffn.up, state, f"{prefix}.intermediate.dense")
                    _copy_linear_like(ffn.down, state, f"{prefix}.output.dense")
                _copy_linear_like(block.output_LayerNorm, state, f"{prefix}.output.LayerNorm")


def _normalise_bert_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strips a ``bert.`` prefix and renames old TF-style LayerNorm ``gamma``/``beta``."""
    normalised = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        normalised[key] = value
    if "embeddings.word_embeddings.weight" not in normalised:
        raise ValueError("the backbone weights are not a BERT model's (no embeddings.word_embeddings.weight)")
    return normalised


def _copy_linear_like(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    for name in ("weight", "bias"):
        key = f"{prefix}.{name}"
        if key not in state:
            raise ValueError(f"the backbone weights have no {key}")
        getattr(module, name).copy_(state[key])


class IMMPreTrainedModel(nn.Module):
    """Construction, saving and loading shared by the task models."""

    def __init__(self, config: IMMConfig):
        super().__init__()
        self.config = config
        self.encoder = IMMEncoder(config)

    @classmethod
    def from_backbone(cls, config: IMMConfig, backbone_dir: str | Path):
        """A new model whose encoder starts from the BERT weights in ``backbone_dir`` (safetensors)."""
        weights = Path(backbone_dir) / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"backbone {backbone_dir} has no {WEIGHTS_FILE}")
        model = cls(config)
        model.encoder.load_backbone_state(load_file(str(weights)))
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "task": self.config.task})
        self.config.to_json_file(directory / CONFIG_FILE)

    def _sw_loss(
        self,
        encoded: EncoderOutput,
        word_index: torch.Tensor,
        word_mask: torch.Tensor,
        has_image: torch.Tensor,
        teacher_text: torch.Tensor | None,
        teacher_image: torch.Tensor | None,
    ) -> SWLossOutput | None:
        """SW over the examples of the batch that have an image (needs two, for in-batch matching);
        None without the CLIP teacher's embeddings."""
        if teacher_text is None or teacher_image is None:
            return None
        rows = has_image.nonzero().squeeze(-1)
        if rows.numel() < 2 or encoded.isa_visual_augmented is None:
            return None
        visual, augmented = encoded.isa_visual, encoded.isa_visual_augmented
        if encoded.visual_per_example:  # joint attention: back to one row per picture
            visual, augmented = visual[rows], augmented[rows]
        words = gather_positions(encoded.isa_text[rows], word_index[rows])
        mask = word_mask[rows].unsqueeze(-1).to(words.dtype)
        text_word = (words * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        image_word = augmented[:, 1:].mean(dim=1)  # one row per picture, in batch order
        return sw_loss(
            encoded.isa_text[rows, 0],
            visual[:, 0],
            text_word,
            image_word,
            teacher_targets(teacher_text[rows], teacher_image[rows]),
            alpha=self.config.alpha,
            beta=self.config.beta,
            temperature=self.config.sw_temperature,
        )

    def _combine(self, logits, task_loss, sw, distillation=None, distill_weight: float = 0.5) -> IMMOutput:
        if task_loss is None and distillation is None:
            return IMMOutput(logits=logits, sw=sw)
        if task_loss is None:  # soft targets without labels: a batch of unlabelled examples
            task_loss = logits.sum() * 0.0
        loss = self.config.delta * task_loss
        if distillation is not None:
            loss = (1.0 - distill_weight) * loss + distill_weight * distillation
        if sw is not None:
            loss = loss + self.config.gamma * sw.total
        return IMMOutput(logits=logits, loss=loss, task_loss=task_loss, sw=sw, distillation=distillation)


def _gold_rows(has_gold: torch.Tensor | None, labels: torch.Tensor | None) -> slice | torch.Tensor | None:
    """The rows of the batch whose gold labels count, as an index: all of them (``slice(None)``, no
    copy), those ``has_gold`` marks (an unlabelled example of a distillation run has none), or None
    when there is no gold loss (no labels, or no row with gold)."""
    if labels is None:
        return None
    if has_gold is None or bool(has_gold.all()):
        return slice(None)
    rows = has_gold.nonzero().squeeze(-1)
    return rows if rows.numel() else None


class IMMForNER(IMMPreTrainedModel):
    """IMM with a CRF tagger over words."""

    def __init__(self, config: IMMConfig):
        super().__init__(config)
        self.head = NERHead(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        word_index: torch.Tensor,
        word_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
        labels: torch.Tensor | None = None,
        augmented_pixel_values: torch.Tensor | None = None,
        teacher_text: torch.Tensor | None = None,
        teacher_image: torch.Tensor | None = None,
        word_shape: torch.Tensor | None = None,
        soft_targets: torch.Tensor | None = None,
        soft_target_mask: torch.Tensor | None = None,
        soft_target_weight: torch.Tensor | None = None,
        has_gold: torch.Tensor | None = None,
        distill_weight: float = 0.5,
        **unused: torch.Tensor,
    ) -> IMMOutput:
        encoded = self.encoder(input_ids, attention_mask, pixel_values, has_image, augmented_pixel_values)
        emissions = self.head.emissions(encoded.text, word_index, word_shape)
        sw = self._sw_loss(encoded, word_index, word_mask, has_image, teacher_text, teacher_image)
        rows = _gold_rows(has_gold, labels)
        task_loss = None if rows is None else self.head.loss(emissions[rows], labels[rows], word_mask[rows])
        distillation = None
        if soft_targets is not None:
            distillation = ner_distillation_loss(
                emissions, self.head.crf, word_mask, soft_targets, soft_target_mask, soft_target_weight
            )
        return self._combine(emissions, task_loss, sw, distillation, distill_weight)

    @torch.no_grad()
    def predict(self, **batch: torch.Tensor) -> list[list[str]]:
        """BIO tags per word of each example."""
        emissions = self.forward(**batch).logits
        return [
            [self.config.labels[t] for t in row] for row in self.head.decode(emissions, batch["word_mask"])
        ]


class IMMForRE(IMMPreTrainedModel):
    """IMM with a relation classifier over the marked entity pair."""

    def __init__(self, config: IMMConfig):
        super().__init__(config)
        self.head = REHead(config)
        self.loss_function = nn.CrossEntropyLoss()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        word_index: torch.Tensor,
        word_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
        marker_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        augmented_pixel_values: torch.Tensor | None = None,
        teacher_text: torch.Tensor | None = None,
        teacher_image: torch.Tensor | None = None,
        soft_targets: torch.Tensor | None = None,
        soft_target_weight: torch.Tensor | None = None,
        has_gold: torch.Tensor | None = None,
        distill_weight: float = 0.5,
        **unused: torch.Tensor,
    ) -> IMMOutput:
        encoded = self.encoder(input_ids, attention_mask, pixel_values, has_image, augmented_pixel_values)
        logits = self.head(encoded.text, marker_index)
        sw = self._sw_loss(encoded, word_index, word_mask, has_image, teacher_text, teacher_image)
        rows = _gold_rows(has_gold, labels)
        task_loss = None if rows is None else self.loss_function(logits[rows].float(), labels[rows])
        distillation = None
        if soft_targets is not None:
            distillation = re_distillation_loss(logits, soft_targets, soft_target_weight)
        return self._combine(logits, task_loss, sw, distillation, distill_weight)

    @torch.no_grad()
    def predict(self, **batch: torch.Tensor) -> list[str]:
        logits = self.forward(**batch).logits
        return [self.config.labels[i] for i in logits.argmax(dim=-1).tolist()]


def build_task_model(config: IMMConfig, backbone_dir: str | Path | None = None) -> IMMPreTrainedModel:
    """The model of ``config.task``, its encoder started from the BERT weights in ``backbone_dir``
    when given (freshly initialised otherwise). Training, checkpoints and bundles build their
    models here."""
    model_class = task_spec(config.task).load("model_class")
    if backbone_dir is None:
        return model_class(config)
    return model_class.from_backbone(config, backbone_dir)
