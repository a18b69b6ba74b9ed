"""Checks of the running `docker compose up` deployment, as a client and as an operator would make them.

Run by tests/docker/run.sh (``make test-docker``) once the container is healthy; not collected by the
main suite (the file name has no ``test_`` prefix). The script passes the container's URL, its id,
the image name and the docker client in ``IMM_DOCKER_*`` variables.

The container's answers are compared with those of the same bundles (./weights, as mounted) served
in this process by the local install: the image runs the locked versions, so both must agree.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.utils import canonicalize_name
from PIL import Image

from imm import DISTRIBUTION
from service import Settings, create_app
from tests.conftest import jpeg_bytes
from tests.test_lock import LOCKS, pins
from tests.test_service import ServerThread

ROOT = Path(__file__).resolve().parents[2]
URL = os.environ.get("IMM_DOCKER_URL", "")
CONTAINER = os.environ.get("IMM_DOCKER_CONTAINER", "")
IMAGE = os.environ.get("IMM_DOCKER_IMAGE", "imm-service:cpu")
DOCKER = os.environ.get("IMM_DOCKER_CLI", "docker")
#: Aim of the issue; the image is the serving install on Debian's python3.11 (base included).
CPU_IMAGE_MAX_BYTES = 400e6

if not (URL and CONTAINER):
    pytest.skip("run by tests/docker/run.sh (make test-docker)", allow_module_level=True)

TWEET = "Kevin Durant and Stephen Curry lead the Golden State Warriors past the Lakers in Los Angeles #NBA"
HEAD, TAIL = (0, 12), (17, 30)  # Kevin Durant, Stephen Curry


def png_bytes(width: int = 200, height: int = 150) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(width, height, seed=3))).convert("RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=check, timeout=60)


def exec_in_container(*command: str) -> subprocess.CompletedProcess[str]:
    return docker("exec", CONTAINER, *command, check=False)


@pytest.fixture(scope="module")
def container() -> dict[str, Any]:
    (info,) = json.loads(docker("inspect", CONTAINER).stdout)
    return info


@pytest.fixture(scope="module")
def remote() -> Iterator[httpx.Client]:
    with httpx.Client(base_url=URL, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def local() -> Iterator[httpx.Client]:
    """The same bundles, served in this process by the local install."""
    settings = Settings(ner_bundle=ROOT / "weights" / "ner", re_bundle=ROOT / "weights" / "re", api_key=None)
    with ServerThread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def reads_pictures(task: str) -> bool:
    """Whether the shipped bundle has a visual stream (the default text-only ones do not, and
    answer ``image_used: false`` with a note)."""
    manifest = json.loads((ROOT / "weights" / task / "manifest.json").read_text(encoding="utf-8"))
    return bool(manifest["visual_stream"])


def assert_same_answer(remote_answer: httpx.Response, local_answer: httpx.Response) -> dict[str, Any]:
    """The container's answer is the local one: same spans, labels and model; scores within 1e-4."""
    assert remote_answer.status_code == 200, remote_answer.text
    assert local_answer.status_code == 200, local_answer.text
    got, expected = remote_answer.json(), local_answer.json()
    scores = {"entities", "score", "scores"}
    assert {k: v for k, v in got.items() if k not in scores} == {
        k: v for k, v in expected.items() if k not in scores
    }
    if "entities" in got:
        spans = [(e["text"], e["type"], e["start"], e["end"]) for e in got["entities"]]
        assert spans == [(e["text"], e["type"], e["start"], e["end"]) for e in expected["entities"]]
        assert [e["score"] for e in got["entities"]] == pytest.approx(
            [e["score"] for e in expected["entities"]], abs=1e-4
        )
    else:
        assert got["relation"] == expected["relation"]
        assert got["scores"] == pytest.approx(expected["scores"], abs=1e-4)
    return got


# --- as a client -------------------------------------------------------------------------------


def test_ready_with_both_models_on_onnx_runtime(remote):
    answer = remote.get("/ready")
    assert answer.status_code == 200, answer.text
    models = answer.json()["models"]
    for task in ("ner", "re"):
        assert models[task]["status"] == "ready", models
        assert models[task]["provider"] == "CPUExecutionProvider", models
    assert remote.get("/health").status_code == 200


@pytest.mark.parametrize(
    "picture", [None, ("photo.jpg", jpeg_bytes(), "image/jpeg"), ("photo.png", png_bytes(), "image/png")]
)
def test_ner_answers_as_the_local_install(remote, local, picture):
    files = {"image": picture} if picture else None
    got = assert_same_answer(
        remote.post("/ner", data={"text": TWEET}, files=files),
        local.post("/ner", data={"text": TWEET}, files=files),
    )
    assert got["image_used"] is (picture is not None and reads_pictures("ner"))
    for entity in got["entities"]:
        assert TWEET[entity["start"] : entity["end"]] == entity["text"]


def test_re_answers_as_the_local_install(remote, local):
    form = {
        "text": TWEET,
        "head_start": HEAD[0],
        "head_end": HEAD[1],
        "tail_start": TAIL[0],
        "tail_end": TAIL[1],
    }
    files = {"image": ("photo.jpg", jpeg_bytes(), "image/jpeg")}
    got = assert_same_answer(
        remote.post("/re", data=form, files=files), local.post("/re", data=form, files=files)
    )
    assert got["relation"] in got["scores"]
    assert got["image_used"] is reads_pictures("re")


def test_bad_uploads_get_their_4xx(remote):
    not_an_image = remote.post(
        "/ner", data={"text": TWEET}, files={"image": ("a.jpg", b"hello", "image/jpeg")}
    )
    assert not_an_image.status_code == 415, not_an_image.text
    assert not_an_image.json()["detail"][0]["loc"] == ["body", "image"]
    truncated = remote.post(
        "/ner", data={"text": TWEET}, files={"image": ("b.jpg", jpeg_bytes()[:600], "image/jpeg")}
    )
    assert truncated.status_code == 422, truncated.text
    assert remote.post("/ner", data={"text": "   "}).status_code == 422


def test_api_docs_work_offline(remote):
    page = remote.get("/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert remote.get(f"/docs/assets/{asset}").status_code == 200, asset
    assert {"/ner", "/re"} <= remote.get("/openapi.json").json()["paths"].keys()


# --- as an operator ----------------------------------------------------------------------------


def test_runs_as_an_unprivileged_user(container):
    assert container["Config"]["User"] == "10001:10001"
    assert exec_in_container("id", "-u").stdout.strip() == "10001"
    status = exec_in_container("cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "10001"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0  # cap_drop: ALL
    assert fields["NoNewPrivs"].strip() == "1"  # no-new-privileges


def test_root_file_system_is_read_only(container):
    assert container["HostConfig"]["ReadonlyRootfs"] is True
    for path in ("/app/x", "/opt/imm/x", "/app/weights/x"):
        attempt = exec_in_container("python", "-c", f"open({path!r}, 'w')")
        assert attempt.returncode != 0 and "Read-only file system" in attempt.stderr, (path, attempt.stderr)
    # /tmp is the tmpfs for spooled uploads.
    assert exec_in_container("python", "-c", "open('/tmp/x', 'w').write('ok')").returncode == 0


def test_healthcheck_reports_healthy(container):
    (fresh,) = json.loads(docker("inspect", CONTAINER).stdout)
    health = fresh["State"]["Health"]
    assert health["Status"] == "healthy", health
    assert health["Log"] and health["Log"][-1]["ExitCode"] == 0
    assert fresh["Config"]["Healthcheck"]["Test"] == ["CMD", "python", "-m", "service.healthcheck"]


def test_image_has_the_locked_versions_and_no_torch():
    script = (
        "import json; from importlib.metadata import distributions;"
        " from packaging.markers import default_environment;"
        " print(json.dumps({'env': default_environment(),"
        " 'dists': {d.metadata['Name']: d.version for d in distributions()}}))"
    )
    answer = exec_in_container("python", "-c", script)
    assert answer.returncode == 0, answer.stderr
    found = json.loads(answer.stdout)
    installed = {canonicalize_name(name): version for name, version in found["dists"].items()}
    locked = pins(LOCKS["serve"], found["env"])
    assert {name: installed.get(name) for name in locked} == locked
    # Nothing else but the project (pip itself was removed from the running image).
    assert set(installed) - set(locked) == {DISTRIBUTION}, set(installed) - set(locked)
    no_torch = exec_in_container("python", "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr


def test_image_size():
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\n{IMAGE}: {size / 1e6:.0f} MB")
    assert size <= CPU_IMAGE_MAX_BYTES, f"{IMAGE} is {size / 1e6:.0f} MB"
