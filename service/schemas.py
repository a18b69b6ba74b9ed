"""The HTTP API's own response models (the answers themselves are ``engine.answers``)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from engine.answers import ModelStatus


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
