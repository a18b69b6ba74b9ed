"""The lock files (requirements/*.txt, made by ``make lock`` with uv) agree with pyproject.toml.

The images install the lock with ``--no-deps`` for the project itself, so a dependency added to
pyproject.toml but not to the lock would be missing from them: these tests catch it offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"serve": ROOT / "requirements" / "serve.txt", "gpu": ROOT / "requirements" / "gpu.txt"}
#: The extras each lock is compiled from (Makefile, `lock`).
LOCK_EXTRAS = {"serve": (), "gpu": ("gpu",)}
#: The images' platform (Dockerfile, Dockerfile.gpu): Python 3.11 on x86-64 Linux.
IMAGE_ENVIRONMENT = {
    **default_environment(),
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def read_lock(path: Path) -> list[Requirement]:
    """The pinned requirements of a pip requirements file (hashes, options and comments dropped)."""
    text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [Requirement(re.sub(r"\s--hash=\S+", "", line)) for line in lines if line and line[0] != "-"]


def pins(path: Path, environment: dict[str, str]) -> dict[str, str]:
    """{canonical name: version} of the lock's entries that apply in ``environment``."""
    found = {}
    for requirement in read_lock(path):
        if requirement.marker is None or requirement.marker.evaluate(environment):
            (specifier,) = requirement.specifier  # exactly one: ==version
            assert specifier.operator == "==", requirement
            found[canonicalize_name(requirement.name)] = specifier.version
    return found


def project_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [
        *project["dependencies"],
        *(r for extra in extras for r in project["optional-dependencies"][extra]),
    ]
    return [Requirement(name) for name in names]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_satisfies_pyproject(lock):
    pinned = pins(LOCKS[lock], IMAGE_ENVIRONMENT)
    for requirement in project_requirements(*LOCK_EXTRAS[lock]):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not in {LOCKS[lock].name}: run make lock"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{LOCKS[lock].name} pins {name}=={pinned[name]}, outside {requirement}: run make lock"
        )


def test_every_pin_has_hashes():
    for path in LOCKS.values():
        entries = re.sub(r"\\\n", " ", path.read_text()).splitlines()
        for entry in entries:
            if entry and entry[0] not in "#- ":
                assert "--hash=sha256:" in entry, f"{path.name}: {entry.split()[0]} has no hash"


def test_the_gpu_image_runs_the_cpu_image_versions():
    """The GPU lock is compiled with the serve lock as constraints: the shared packages are identical."""
    serve, gpu = (pins(LOCKS[name], IMAGE_ENVIRONMENT) for name in ("serve", "gpu"))
    assert serve.keys() <= gpu.keys()
    assert {name: gpu[name] for name in serve} == serve
    assert "torch" in gpu and "torch" not in serve
