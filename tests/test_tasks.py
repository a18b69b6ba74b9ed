"""The task registry (model.tasks): one description per task, which every layer follows."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from model.config import IMMConfig
from model.data import NERExample, REExample
from model.tasks import TASKS, register_task, task_spec

CONLL = "IMGID:7\nAnna\tB-PER\nSmith\tI-PER\nvisits\tO\nParis\tB-LOC\n\n"
MNRE = repr(
    {
        "token": ["Ann", "Lee", "joins", "Acme"],
        "h": {"name": "Ann Lee", "pos": [0, 2]},
        "t": {"name": "Acme", "pos": [3, 4]},
        "img_id": "twitter_1.jpg",
        "relation": "/per/org/member_of",
    }
)


def test_an_unknown_task_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'pos': the tasks are 'ner', 're'"):
        task_spec("pos")
    with pytest.raises(ValueError, match="'ner', 're'"):
        IMMConfig(task="pos", labels=["O"])


@pytest.mark.parametrize(
    ("task", "text", "example"),
    [
        (
            "ner",
            CONLL,
            NERExample(("Anna", "Smith", "visits", "Paris"), ("B-PER", "I-PER", "O", "B-LOC"), "7.jpg"),
        ),
        (
            "re",
            MNRE + "\n",
            REExample(("Ann", "Lee", "joins", "Acme"), (0, 2), (3, 4), "/per/org/member_of", "twitter_1.jpg"),
        ),
    ],
)
def test_each_task_reads_and_scores_its_own_files(tmp_path, task, text, example):
    spec = task_spec(task)
    path = tmp_path / "data.txt"
    path.write_text(text, encoding="utf-8")
    examples = spec.read(path)
    assert examples == [example]
    gold = list(example.tags) if spec.labels_per_word else example.relation
    assert spec.score(examples, [gold])["f1"] == 1.0
    wrong = ["O"] * len(gold) if spec.labels_per_word else "None"
    assert spec.score(examples, [wrong])["f1"] == 0.0


def test_the_registry_imports_neither_torch_nor_the_training_metrics():
    # The CPU server imports model.tasks: it has neither torch nor seqeval.
    code = "import sys, model.tasks; print(sorted({'torch', 'seqeval'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_layer_finds_each_tasks_classes_in_its_description():
    from engine.answers import NERResponse, REResponse
    from engine.pipeline import NERPipeline, REPipeline
    from engine.settings import Settings
    from export.graph import NERGraph, REGraph
    from model.modeling import IMMForNER, IMMForRE

    expected = {
        "ner": (IMMForNER, NERGraph, NERPipeline, NERResponse, "/ner"),
        "re": (IMMForRE, REGraph, REPipeline, REResponse, "/re"),
    }
    assert list(expected) == list(TASKS)
    for name, spec in TASKS.items():
        assert spec.name == name
        parts = tuple(spec.load(part) for part in ("model_class", "graph_wrapper", "pipeline", "answer"))
        assert (*parts, spec.route) == expected[name]
        assert spec.env_name == f"IMM_{name.upper()}_BUNDLE"
        assert spec.bundle_setting in Settings.model_fields
        # The graph takes its inputs in the order the description gives them.
        assert (
            tuple(inspect.signature(spec.load("graph_wrapper").forward).parameters)[1:] == spec.graph_inputs
        )


def test_a_task_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_task(TASKS["ner"])
