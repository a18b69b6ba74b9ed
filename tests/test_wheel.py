"""Issue 36: the wheel as a user gets it (``make test-wheel``; marker ``wheel``, not in ``make test``).

Built from a copy of the checkout (no stale ``build/``), installed with its dependencies from the
registry into a fresh venv outside the checkout, with the ``spacy`` extra and nothing else: then the
plain install's promises are tried there, from a folder that is not the checkout. Slow: pip installs
onnxruntime, fastapi, spaCy, ... (minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import tomllib

from tests.test_server import free_port, wait_ready

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
#: PyPI's default limit on one file.
PYPI_FILE_LIMIT = 100 * 1024 * 1024
#: What is not the project's source: venvs, build output, caches, runs.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "runs", "checkpoints", "__pycache__", ".*_cache",
    ".hypothesis", ".device", "results",
)  # fmt: skip


class Installed:
    def __init__(self, root: Path):
        self.root = root
        self.venv = root / "venv"
        self.bin = self.venv / "bin"
        self.elsewhere = root / "elsewhere"  # the user's folder: not the checkout
        self.elsewhere.mkdir()
        # Only the venv's own: no PYTHONPATH to the checkout, no IMM_* of this shell.
        self.env = {
            name: value
            for name, value in os.environ.items()
            if name not in ("PYTHONPATH", "VIRTUAL_ENV") and not name.startswith(("IMM_", "PROMETHEUS_"))
        }
        self.env["PATH"] = os.pathsep.join([str(self.bin), self.env.get("PATH", "")])

    def run(self, *command: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            command, cwd=cwd or self.elsewhere, env=self.env, capture_output=True, text=True, timeout=900
        )
        if check:
            assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    source = Path(shutil.copytree(ROOT, root / "source", symlinks=True, ignore=NOT_SOURCE))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    user = Installed(root)
    user.run("pip", "install", "-q", "--upgrade", "pip")
    user.run("pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(source))
    (user.wheel,) = (root / "dist").glob("*.whl")
    user.run("pip", "install", "-q", f"{user.wheel}[spacy]")
    return user


def test_the_wheel_ships_the_default_bundles_within_pypis_limit(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    for task in ("ner", "re"):
        assert {
            f"imm/weights/{task}/{name}" for name in ("manifest.json", "model.onnx", "tokenizer.json")
        } <= set(names)
    size = installed.wheel.stat().st_size
    print(f"{installed.wheel.name}: {size / 1e6:.1f} MB")
    assert installed.wheel.name == f"implicit_modality_mining-{VERSION}-py3-none-any.whl"
    assert size < PYPI_FILE_LIMIT


def test_imm_version_and_python_m_imm(installed):
    assert installed.run("imm", "--version").stdout == f"imm {VERSION}\n"
    assert installed.run("python", "-m", "imm", "--version").stdout == f"imm {VERSION}\n"


def test_the_api_from_a_folder_holding_a_folder_named_imm(installed):
    """A script run from the checkout's parent folder (where ``imm/`` is the checkout) imports the
    installed package: a regular package wins over a folder without ``__init__.py``."""
    parent = installed.root / "parent"
    parent.mkdir()
    (parent / "imm").symlink_to(ROOT, target_is_directory=True)  # a checkout cloned as imm/
    (parent / "script.py").write_text(
        "import json, imm\n"
        "nlp = imm.load()\n"
        "answer = nlp('Kevin Durant joins the Golden State Warriors')\n"
        "print(json.dumps({'file': imm.__file__, 'version': imm.__version__, "
        "'answer': answer.to_dict()}))\n"
        "nlp.close()\n"
    )
    result = json.loads(installed.run("python", "script.py", cwd=parent).stdout.splitlines()[-1])
    assert Path(result["file"]).is_relative_to(installed.venv) and result["version"] == VERSION
    entities = [(entity["text"], entity["type"]) for entity in result["answer"]["entities"]]
    assert entities == [("Kevin Durant", "PER"), ("Golden State Warriors", "ORG")]
    assert [relation["relation"] for relation in result["answer"]["relations"]] == ["/per/org/member_of"]


def test_imm_serve_answers_on_the_port_it_is_given(installed):
    port = free_port()
    log = open(installed.root / "server.log", "w+")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["imm", "serve", "--port", str(port)],
        cwd=installed.elsewhere,
        env=installed.env,
        stdout=log,
        stderr=log,
    )

    def output() -> str:
        log.flush()
        log.seek(0)
        return log.read()[-4000:]

    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, output, timeout=300)
        answer = httpx.post(f"{url}/ner", data={"text": "Alice Smith is in Paris"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert [entity["type"] for entity in answer.json()["entities"]] == ["PER", "LOC"]
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def test_spacy_finds_the_component_by_its_entry_point(installed):
    script = (
        "import spacy\n"
        "nlp = spacy.blank('en')\n"
        "nlp.add_pipe('imm_ner')\n"
        "doc = nlp('Alice Smith is in Paris')\n"
        "print([(ent.text, ent.label_) for ent in doc.ents])\n"
        "nlp.get_pipe('imm_ner').close()\n"
    )
    done = installed.run("python", "-c", script)
    assert done.stdout.splitlines()[-1] == "[('Alice Smith', 'PER'), ('Paris', 'LOC')]"


def test_training_is_an_extra_and_says_so(installed):
    assert installed.run("python", "-c", "import torch", check=False).returncode != 0
    done = installed.run("imm", "train", "--help", check=False)
    assert done.returncode == 2
    assert (
        done.stderr
        == "error: imm train needs torch, of the train extra: pip install 'implicit-modality-mining[train]'\n"
    )
