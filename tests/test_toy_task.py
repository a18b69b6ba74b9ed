"""Adding a task is a ``TaskSpec`` plus its model and pipeline classes: a toy task, registered here,
is exported and served by the engine with no other change (docs/architecture.md, "Adding a task")."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from pydantic import BaseModel

from engine import Engine
from engine.pipeline import NERPipeline
from engine.settings import Settings
from model.tasks import NER, TASKS, register_task


class TypeCounts(BaseModel):
    """The toy task's answer: how many entities of each type the text names."""

    counts: dict[str, int]
    model: str


class TypeCountPipeline(NERPipeline):
    """NER's pipeline, answering with counts: a new task's pipeline is its prepare/decode/answer."""

    task = "type_counts"

    def answer(self, prepared, entities) -> TypeCounts:
        return TypeCounts(counts=dict(Counter(entity.type for entity in entities)), model=self.name)


class ToySettings(Settings):
    type_counts_bundle: Path | None = None


TOY = dataclasses.replace(
    NER,
    name="type_counts",
    description="how many entities of each type a text names (a toy task for the tests)",
    pipeline=f"{__name__}:TypeCountPipeline",
    answer=f"{__name__}:TypeCounts",
    bundle_setting="type_counts_bundle",
    route="/type_counts",
)


@pytest.fixture()
def toy_task():
    register_task(TOY)
    yield TOY
    del TASKS[TOY.name]


def test_a_registered_toy_task_is_exported_and_served(toy_task, trained_ner_checkpoint, bundles, tmp_path):
    from export import export_bundle

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(trained_ner_checkpoint, checkpoint)
    config_file = next(checkpoint.rglob("config.json"))
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "task": toy_task.name}))
    bundle = export_bundle(checkpoint, tmp_path / "bundle", log=lambda _: None)
    assert json.loads((bundle / "manifest.json").read_text())["task"] == toy_task.name

    async def serve() -> tuple[TypeCounts, object]:
        settings = ToySettings(ner_bundle=bundles["ner"], re_bundle=None, type_counts_bundle=bundle)
        async with Engine(settings) as engine:
            assert engine.status()[toy_task.name].status == "ready"
            text = "alice smith moved to paris"
            return await engine.run(toy_task.name, text), await engine.ner(text)

    counts, entities = asyncio.run(serve())
    assert isinstance(counts, TypeCounts)
    # The same weights as the NER bundle: the counts are its entities', counted.
    assert counts.counts == dict(Counter(entity.type for entity in entities.entities))
    assert sum(counts.counts.values()) >= 1
