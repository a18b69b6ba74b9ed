"""The HTTP API's own response models (the answers themselves are ``engine.answers``)."""

from __future__ import annotations

from typing import Any

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from engine.answers import ModelStatus, Pairs


class ReadyResponse(BaseModel):
    ready: bool
    models: dict[str, ModelStatus]


class HealthResponse(BaseModel):
    status: str = "ok"


class ErrorResponse(BaseModel):
    detail: str | list[dict] = Field(
        description="A message, or for 422 a list of {loc, msg, type} naming the field"
    )
    request_id: str | None = None


# --- the inference requests' fields: one set per path, sent as a form or as JSON -------------------
# A form carries the picture as a file part ``image``; a JSON body as base64 in ``image_base64``
# (service.forms reads either into these models).

_TEXT = Field(
    description="The tweet, as posted (any script, emoji included)",
    examples=["Alice Smith is in Paris with the Lakers 🏀 #NBA @alice"],
)


def _offset(role: str, end: str, example: int) -> Any:
    return Field(
        description=f"Character offset (code points) of the {end} of the {role} entity", examples=[example]
    )


class NERFields(BaseModel):
    text: str = _TEXT


class REFields(BaseModel):
    text: str = Field(
        description="The tweet, as posted", examples=["Alice Smith moved to Paris last year #newhome"]
    )
    head_start: int = _offset("head", "start", 0)
    head_end: int = _offset("head", "end", 11)
    tail_start: int = _offset("tail", "start", 21)
    tail_end: int = _offset("tail", "end", 26)


class ExtractFields(BaseModel):
    text: str = _TEXT
    pairs: Pairs = Field(
        "typed",
        description="Which entity pairs to classify: 'typed' (the default: only the pairs whose head "
        "and tail types some relation of the RE model joins, as its labels name them: "
        "/per/loc/place_of_residence joins a PER head to a LOC tail) or 'all' (every ordered pair of "
        "distinct entities: n entities make n(n-1) pairs; for an RE model whose labels name no types)",
    )
    include_none: bool = Field(
        False, description="Also list the pairs whose most probable relation is 'None'"
    )


class _JsonBody(BaseModel):
    # A misspelt field is a 422 naming it, not a default silently used.
    model_config = ConfigDict(extra="forbid")

    image_base64: str | None = Field(
        None,
        description="Optional picture posted with the tweet (JPEG, PNG, GIF, WebP, ...), its file's bytes "
        "in base64 (standard alphabet; line breaks and a 'data:image/...;base64,' prefix are allowed)",
    )


class _FormBody(BaseModel):
    image: UploadFile | None = Field(
        None, description="Optional picture posted with the tweet (JPEG, PNG, GIF, WebP, ...)"
    )


class NERForm(_FormBody, NERFields):
    pass


class NERJson(_JsonBody, NERFields):
    pass


class REForm(_FormBody, REFields):
    pass


class REJson(_JsonBody, REFields):
    pass


class ExtractForm(_FormBody, ExtractFields):
    pass


class ExtractJson(_JsonBody, ExtractFields):
    pass
