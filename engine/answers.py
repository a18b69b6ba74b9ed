"""The engine's answers: the typed results of ``Engine.ner``, ``re`` and ``extract``, and a model's status.

Every front end returns them as they are: the HTTP routes as JSON (with the examples /docs shows),
the Python API and ``imm extract`` as objects and records. Plain pydantic models, no HTTP; each is an
``Answer``, whose ``to_dict()`` and ``to_json()`` give the HTTP API's JSON."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: A character span of the text: (start, end), end exclusive.
Span = tuple[int, int]
#: Which entity pairs ``extract`` classifies: those some relation of the RE model can join by their
#: types ("typed"), or every ordered pair of distinct entities ("all").
Pairs = Literal["typed", "all"]

# The entities of the /ner and /extract examples that /docs shows.
_EXAMPLE_ENTITIES = [
    {"text": "Alice Smith", "type": "PER", "start": 0, "end": 11, "score": 0.981},
    {"text": "Paris", "type": "LOC", "start": 19, "end": 24, "score": 0.994},
    {"text": "Lakers", "type": "ORG", "start": 34, "end": 40, "score": 0.972},
]
_MODEL_FIELD = Field(description="The bundle that answered: '<model>@<sha12>'")
_TRUNCATED_FIELD = Field(
    description="True when the text was longer than the model's window: only its first window was read"
)
_NOTES_FIELD = Field(
    default_factory=list,
    description="What else to know about this answer, e.g. that a picture was sent but not used "
    "because the model was trained without pictures",
)


class Answer(BaseModel):
    """An answer, or a part of one, as the HTTP API's JSON: ``to_dict()`` for ``json.dumps`` (plain
    dicts, lists, strings, numbers), ``to_json()`` for the text itself."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self, indent: int | None = None) -> str:
        return self.model_dump_json(indent=indent)


class EntityOut(Answer):
    text: str = Field(description="The entity as it stands in the input: text[start:end]")
    type: str = Field(description="Entity type (PER, LOC, ORG, MISC for the Twitter datasets)")
    start: int = Field(description="Offset of its first character in the input (Unicode code points)")
    end: int = Field(description="Offset just after its last character")
    score: float = Field(description="Mean CRF marginal probability of the entity's tags (0-1)")


class NERResponse(Answer):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "entities": _EXAMPLE_ENTITIES[:2],
                    "image_used": True,
                    "truncated": False,
                    "model": "imm-ner@3f2a9c1d0b7e",
                }
            ]
        }
    )

    entities: list[EntityOut]
    image_used: bool = Field(description="Whether an image was given and read by the model")
    truncated: bool = _TRUNCATED_FIELD
    model: str = _MODEL_FIELD
    notes: list[str] = _NOTES_FIELD


class REResponse(Answer):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "relation": "/per/loc/place_of_residence",
                    "score": 0.912,
                    "scores": {
                        "None": 0.041,
                        "/per/loc/place_of_residence": 0.912,
                        "/per/org/member_of": 0.047,
                    },
                    "image_used": False,
                    "truncated": False,
                    "model": "imm-re@a41c07e2d9f3",
                }
            ]
        },
    )

    relation: str = Field(description="The most probable relation between head and tail")
    score: float = Field(description="Its probability (softmax of the logits)")
    scores: dict[str, float] = Field(description="Probability of every relation")
    image_used: bool = Field(description="Whether an image was given and read by the model")
    truncated: bool = _TRUNCATED_FIELD
    model: str = _MODEL_FIELD
    notes: list[str] = _NOTES_FIELD


class RelationOut(Answer):
    head: int = Field(description="Index of the head entity in `entities`")
    tail: int = Field(description="Index of the tail entity in `entities`")
    relation: str = Field(description="The most probable relation from head to tail")
    score: float = Field(description="Its probability (softmax of the logits)")
    # The entities themselves too, so that a relation reads on its own (a copy of entities[head]).
    head_entity: EntityOut = Field(description="The head entity: `entities[head]`")
    tail_entity: EntityOut = Field(description="The tail entity: `entities[tail]`")


class ExtractModels(Answer):
    ner: str = Field(description="The NER bundle that found the entities: '<model>@<sha12>'")
    re: str | None = Field(
        description="The RE bundle that classified the pairs: '<model>@<sha12>'; null when the RE model "
        "is switched off (IMM_RE_BUNDLE empty: `relations` is then empty and `notes` says so)"
    )


class ExtractResponse(Answer):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "entities": _EXAMPLE_ENTITIES,
                    "relations": [
                        {
                            "head": 0,
                            "tail": 1,
                            "relation": "/per/loc/place_of_residence",
                            "score": 0.912,
                            "head_entity": _EXAMPLE_ENTITIES[0],
                            "tail_entity": _EXAMPLE_ENTITIES[1],
                        },
                        {
                            "head": 0,
                            "tail": 2,
                            "relation": "/per/org/member_of",
                            "score": 0.887,
                            "head_entity": _EXAMPLE_ENTITIES[0],
                            "tail_entity": _EXAMPLE_ENTITIES[2],
                        },
                    ],
                    "image_used": True,
                    "truncated": False,
                    "models": {"ner": "imm-ner@3f2a9c1d0b7e", "re": "imm-re@a41c07e2d9f3"},
                    "notes": [],
                }
            ]
        }
    )

    entities: list[EntityOut] = Field(description="The entities, as /ner answers them (in text order)")
    relations: list[RelationOut] = Field(
        description="The relation of each pair asked (see `pairs`), by entity index and with the "
        "entities themselves, in the order of the pairs (head, then tail, in text order); a pair whose best relation is 'None' only with "
        "include_none=true"
    )
    image_used: bool = Field(
        description="Whether an image was given and read by a model (`notes` names a model that ignored it)"
    )
    truncated: bool = Field(
        description="True when the text was longer than a model's window: only its first window was read"
    )
    models: ExtractModels
    notes: list[str] = _NOTES_FIELD


class ModelStatus(Answer):
    model_config = ConfigDict(protected_namespaces=())

    status: str = Field(description="'ready', 'loading', 'absent' (not configured or not found) or 'failed'")
    detail: str | None = None
    name: str | None = None
    provider: str | None = Field(
        None, description="What runs it: an ONNX Runtime execution provider, or the PyTorch runtime's device"
    )
