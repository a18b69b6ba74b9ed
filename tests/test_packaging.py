"""Issue 36, the package: its own name on the registry, a plain install that serves, the default
bundles inside it, ``imm.__version__``, and the checkout's parent folder. The wheel itself, installed
into a fresh venv, is tests/test_wheel.py (``make test-wheel``)."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

import imm
from engine.settings import DEFAULT_WEIGHTS, Settings

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def requirement_names(requirements: list[str]) -> set[str]:
    return {Requirement(requirement).name for requirement in requirements}


def installed_here() -> bool:
    """Whether this environment has the project installed under its name (older installs were ``imm``)."""
    try:
        return importlib.metadata.version(imm.DISTRIBUTION) is not None
    except importlib.metadata.PackageNotFoundError:
        return False


def test_the_distribution_has_its_own_name():
    # `imm` on PyPI is an unrelated project (hidden Markov models): pip install 'imm[...]' installed it
    assert PROJECT["name"] == imm.DISTRIBUTION == "implicit-modality-mining"
    assert PROJECT["scripts"]["imm"] == "imm.cli:main"


def test_the_plain_install_has_the_api_the_commands_and_the_cpu_server():
    base = requirement_names(PROJECT["dependencies"])
    assert {
        "onnxruntime",
        "tokenizers",
        "fastapi",
        "uvicorn",
        "python-multipart",
        "pydantic-settings",
    } <= base
    assert "torch" not in base and "serve" not in PROJECT["optional-dependencies"]
    assert "torch" in requirement_names(PROJECT["optional-dependencies"]["train"])
    assert "torch" in requirement_names(PROJECT["optional-dependencies"]["gpu"])


def test_the_default_bundles_are_package_data_and_the_defaults():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["imm"]
    shipped = [path for path in (ROOT / "weights").rglob("*") if path.is_file()]
    assert shipped, "weights/ holds no file"
    for path in shipped:  # a file added to a bundle is not silently left out of the wheel
        relative = f"weights/{path.relative_to(ROOT / 'weights').as_posix()}"
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
    assert (ROOT / "imm" / "weights").resolve() == (ROOT / "weights").resolve() == DEFAULT_WEIGHTS.resolve()
    settings = Settings(_env_file=None)
    assert (settings.ner_bundle, settings.re_bundle) == (DEFAULT_WEIGHTS / "ner", DEFAULT_WEIGHTS / "re")


def test_the_version_is_the_installed_distributions():
    if not installed_here():
        pytest.skip(f"{imm.DISTRIBUTION} is not installed in this environment (make install)")
    assert imm.__version__ == PROJECT["version"]


def test_a_script_in_the_checkouts_parent_folder_imports_the_package(tmp_path):
    """The checkout cloned as ``imm/``, a script beside it: ``import imm`` is the package (the dev
    install puts the checkout on sys.path: Makefile, editable_mode=compat), not the checkout's folder."""
    if not installed_here():
        pytest.skip(f"{imm.DISTRIBUTION} is not installed in this environment (make install)")
    (tmp_path / "imm").symlink_to(ROOT, target_is_directory=True)
    (tmp_path / "script.py").write_text("import imm\nprint(imm.__file__, imm.load.__name__)\n")
    done = subprocess.run(
        [sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[1] == "load" and done.stdout.split()[0].endswith("__init__.py")
