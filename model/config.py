"""Configuration objects: everything needed to rebuild a model and its preprocessing.

``IMMConfig`` round-trips through JSON (``config.json`` in a checkpoint, the manifest of a
serving bundle), so a checkpoint rebuilds its model without the backbone directory it was
trained from. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.tasks import task_spec

Task = Literal["ner", "re"]  # the names in model.tasks.TASKS, for type checkers
AttentionMode = Literal["separate", "joint"]
REPooling = Literal["cls", "entity_start"]
IASlots = Literal["token", "all"]

# CLIP's normalisation constants: the image statistics the SW teacher was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Entity markers put around the head and tail of a relation (as in HVPNeT/MKGformer).
ENTITY_MARKERS = ("<s>", "</s>", "<o>", "</o>")


@dataclass
class PreprocessingConfig:
    """Constants shared by training, export and serving: change one, retrain."""

    image_size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_seq_len: int = 128
    cls_token: str = "[CLS]"
    sep_token: str = "[SEP]"
    pad_token: str = "[PAD]"
    unk_token: str = "[UNK]"
    entity_markers: tuple[str, str, str, str] = ENTITY_MARKERS

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


@dataclass
class BackboneConfig:
    """The BERT-family text encoder's dimensions (read from its ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> BackboneConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"backbone directory {directory} has no config.json")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("model_type", "bert") != "bert":
            raise ValueError(f"backbone {directory} is a {data.get('model_type')!r}, not a BERT-family model")
        return cls.from_dict(data)


def default_layer_split(num_layers: int) -> tuple[int, int]:
    """The project's default split of the backbone's layers: two thirds ISA, one third IA (12 -> 8 + 4,
    6 -> 4 + 2). The paper's text gives no layer counts."""
    num_ia = max(1, num_layers // 3)
    return num_layers - num_ia, num_ia


@dataclass
class IMMConfig:
    """Hyper-parameters of an IMM model for one task.

    Attributes named after the paper: ``alpha`` and ``beta`` weight the sentence- and word-level
    SW losses (eq. 14), ``gamma`` and ``delta`` weight SW against the task loss (eqs. 25-26).
    The backbone's layers are used in order: the first ``num_isa_layers`` become ISA blocks,
    the next ``num_ia_layers`` IA blocks (see docs/architecture.md for the other choices).
    ``ia_slots`` picks the reading of eq. 21 (``model.ia``): each text token activates its own
    inserted visual slot (``"token"``) or all n slots of its example (``"all"``, Kformer-style).
    """

    task: Task
    labels: list[str]
    backbone: str = ""
    backbone_config: BackboneConfig = field(default_factory=BackboneConfig)
    num_isa_layers: int = 8
    num_ia_layers: int = 4
    patch_size: int = 32
    attention_mode: AttentionMode = "separate"
    use_ia: bool = True
    ia_slots: IASlots = "token"
    ia_top_k: int | None = None
    ia_scale: bool = True
    ia_key_scale: bool = True
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.1
    delta: float = 1.0
    sw_temperature: float | None = 0.07
    re_pooling: REPooling = "cls"
    # NER: width of a learned embedding of each word's casing class (model.preprocessing.word_shape),
    # beside its first sub-token's state; 0: none (the paper's head). For uncased backbones.
    word_shape_size: int = 0
    classifier_dropout: float = 0.1
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)

    def __post_init__(self) -> None:
        task_spec(self.task)  # ValueError naming the known tasks
        if not self.labels:
            raise ValueError("labels must not be empty")
        if self.attention_mode not in ("separate", "joint"):
            raise ValueError(f"attention_mode must be 'separate' or 'joint', not {self.attention_mode!r}")
        if self.ia_slots not in ("token", "all"):
            raise ValueError(f"ia_slots must be 'token' or 'all', not {self.ia_slots!r}")
        if self.re_pooling not in ("cls", "entity_start"):
            raise ValueError(f"re_pooling must be 'cls' or 'entity_start', not {self.re_pooling!r}")
        total = self.num_isa_layers + self.num_ia_layers
        if (
            self.num_isa_layers < 1
            or self.num_ia_layers < 0
            or total > self.backbone_config.num_hidden_layers
        ):
            raise ValueError(
                f"layer split {self.num_isa_layers} ISA + {self.num_ia_layers} IA does not fit a backbone "
                f"of {self.backbone_config.num_hidden_layers} layers"
            )
        if self.preprocessing.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.preprocessing.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.preprocessing.image_size // self.patch_size) ** 2

    @classmethod
    def from_backbone(
        cls, backbone: str | Path, task: Task, labels: list[str], **overrides: Any
    ) -> IMMConfig:
        """A config for ``backbone`` (a local BERT-family directory) with the default layer split."""
        backbone_config = BackboneConfig.from_pretrained(backbone)
        num_isa, num_ia = default_layer_split(backbone_config.num_hidden_layers)
        values: dict[str, Any] = {"num_isa_layers": num_isa, "num_ia_layers": num_ia}
        values.update(overrides)
        return cls(
            task=task, labels=list(labels), backbone=str(backbone), backbone_config=backbone_config, **values
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IMMConfig:
        data = dict(data)
        data["backbone_config"] = BackboneConfig.from_dict(data.get("backbone_config", {}))
        data["preprocessing"] = PreprocessingConfig.from_dict(data.get("preprocessing", {}))
        # Configs written before these options existed: one slot per token, unscaled inserted keys.
        data.setdefault("ia_slots", "token")
        data.setdefault("ia_key_scale", False)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown IMMConfig fields: {sorted(unknown)}")
        return cls(**data)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_json_file(cls, path: str | Path) -> IMMConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
