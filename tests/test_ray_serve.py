"""The service on Ray Serve (``service/ray_app.py``), on a real two-node Ray cluster.

``ray.cluster_utils.Cluster`` starts a head and a worker node on this machine (one CPU each, each
node its own raylet and object store, Serve's proxy on every node behind one loopback port), and
the IMM deployment runs there on the small trained test bundles. The tests check that answers
equal ``python -m service``'s for the same requests (errors included), that requests reach the
replicas of both nodes, that killing a replica under load costs only the requests it held and
that Serve replaces it, and that the autoscaler adds a replica under load and removes it after.

Run with ``make test-ray`` (these tests carry the ``ray`` marker, which ``make test`` leaves out:
a cluster takes a while to start); they need the ``ray`` extra (``pip install -e .[ray]``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.settings import Settings
from tests.conftest import jpeg_bytes
from tests.ray_cluster import local_ray_cluster

try:
    import ray
    from ray import serve

    from service.ray_app import DEPLOYMENT_NAME, RaySettings, application
except ImportError as error:  # collected by `make test` too, which deselects these tests
    MISSING_RAY: ImportError | None = error
else:
    MISSING_RAY = None

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
APP = "imm"
API_KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Short periods, so that the tests see a dead replica replaced and the autoscaler act in seconds.
HEALTH_CHECK = {"health_check_period_s": 1.0, "health_check_timeout_s": 5.0}
CLIENT_TIMEOUT_S = 15.0  # a request in flight on a replica that dies may never be answered


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service_values(tmp_path_factory, trained_ner_checkpoint, trained_re_checkpoint) -> dict[str, Any]:
    """The settings both servers run with: the conftest checkpoints exported as bundles, small limits."""
    from export import export_bundle

    root = tmp_path_factory.mktemp("ray_bundles")
    return {
        "ner_bundle": export_bundle(trained_ner_checkpoint, root / "ner", log=lambda _: None),
        "re_bundle": export_bundle(trained_re_checkpoint, root / "re", log=lambda _: None),
        "max_batch_size": 8,
        "batch_wait_ms": 3,
        "intra_op_threads": 1,
        "preprocess_threads": 1,
        "max_upload_bytes": 400_000,
        "max_text_chars": 2_000,
        "api_key": API_KEY,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, period_s: float = 0.2) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(period_s)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def single_process(service_values) -> Iterator[str]:
    """``python -m service`` with the same settings, on its own port: the reference answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMM_")}
    env.update({f"IMM_{name.upper()}": str(value) for name, value in service_values.items()})
    env.update(IMM_HOST="127.0.0.1", IMM_PORT=str(port), IMM_LOG_LEVEL="warning")
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            return httpx.get(f"{url}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 120, "python -m service became ready")
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=30)


@dataclass
class RayServe:
    """A running two-node cluster with Serve's proxies on ``url``."""

    cluster: Any  # ray.cluster_utils.Cluster
    url: str
    settings: Settings

    def deploy(self, **ray_values: Any) -> None:
        """(Re)deploys the IMM application with these ``RaySettings`` and waits until it runs."""
        serve.run(
            application(self.settings, RaySettings(**ray_values)), name=APP, route_prefix="/", blocking=False
        )

    def replica_states(self) -> dict[str, int]:
        return dict(serve.status().applications[APP].deployments[DEPLOYMENT_NAME].replica_states)

    def running(self, count: int) -> bool:
        """Exactly ``count`` replicas, all running (none starting or stopping)."""
        return self.replica_states() == {"RUNNING": count}

    def replica_actors(self) -> list[str]:
        prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT_NAME}#"
        return [
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
        ]


@pytest.fixture(scope="module")
def ray_serve(service_values) -> Iterator[RayServe]:
    if MISSING_RAY is not None:
        pytest.fail(f"the ray extra is not installed (pip install -e '.[ray]'): {MISSING_RAY}")
    with local_ray_cluster() as cluster:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield RayServe(cluster, f"http://127.0.0.1:{port}", Settings(**service_values))
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def two_replicas(ray_serve) -> RayServe:
    """Two replicas of one CPU each: one on each node."""
    ray_serve.deploy(min_replicas=2, max_replicas=2, cpus_per_replica=1, **HEALTH_CHECK)
    wait_until(lambda: ray_serve.running(2), 60, "two replicas running")
    return ray_serve


def post(url: str, path: str, data: dict, files: dict | None = None, headers: dict | None = None):
    """One request on a new connection (a new connection may land on either node's proxy)."""
    return httpx.post(
        f"{url}{path}", data=data, files=files, headers=headers or AUTH, timeout=CLIENT_TIMEOUT_S
    )


# --- configuration -----------------------------------------------------------------------------


def test_deployment_options_follow_the_settings(monkeypatch):
    if MISSING_RAY is not None:
        pytest.fail(f"the ray extra is not installed (pip install -e '.[ray]'): {MISSING_RAY}")
    from pydantic import ValidationError

    from service.ray_app import deployment_options, replica_settings

    settings = Settings(ner_bundle="weights/ner", re_bundle=None, intra_op_threads=0, max_batch_size=8)
    fixed = deployment_options(RaySettings(min_replicas=3, max_replicas=3, gpus_per_replica=0.5), settings)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert (
        fixed["max_ongoing_requests"] == 2 * settings.max_batch_size
    )  # Serve's default, 5, would cap batches
    with pytest.raises(ValidationError, match="below min_replicas"):
        RaySettings(min_replicas=3)
    monkeypatch.setenv("IMM_RAY_MAX_REPLICAS", "4")
    monkeypatch.setenv("IMM_RAY_TARGET_ONGOING_REQUESTS", "8")
    scaling = deployment_options(RaySettings(), settings)["autoscaling_config"]
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 8)
    # A replica's working directory is not the caller's; its threads match its CPUs.
    replica = replica_settings(settings, RaySettings(cpus_per_replica=2))
    assert replica.ner_bundle == (Path.cwd() / "weights/ner")
    assert (replica.inference_workers, replica.intra_op_threads) == (2, 1)
    one = replica_settings(settings, RaySettings(cpus_per_replica=1))
    assert (one.inference_workers, one.intra_op_threads) == (1, 1)
    assert replica_settings(settings, RaySettings(cpus_per_replica=0.5)).intra_op_threads == 0


# --- the same service --------------------------------------------------------------------------

PHOTO = jpeg_bytes(320, 240, seed=3)
TEXT = "RT @fan: alice smith 👩‍👩‍👧‍👦 in paris 🇫🇷 with the lakers!! #win"
RE_TEXT = "alice 😂 moved to paris #win"
# (method, path, form fields, files, headers): answers, then each kind of error of docs/service.md.
REQUESTS: list[tuple[str, str, dict, dict | None, dict]] = [
    ("POST", "/ner", {"text": TEXT}, None, AUTH),
    (
        "POST",
        "/ner",
        {"text": "bob jones and carol in london"},
        {"image": ("p.jpg", PHOTO, "image/jpeg")},
        AUTH,
    ),
    ("POST", "/ner", {"text": "dave lee सिंह berlin 中文 madrid\u200bbulls !"}, None, AUTH),
    (
        "POST",
        "/re",
        {"text": RE_TEXT, "head_start": 0, "head_end": 5, "tail_start": 17, "tail_end": 22},
        {"image": ("p.jpg", PHOTO, "image/jpeg")},
        AUTH,
    ),
    (
        "POST",
        "/re",
        {"text": RE_TEXT, "head_start": 0, "head_end": 5, "tail_start": 17, "tail_end": 20},
        None,
        AUTH,
    ),
    ("POST", "/re", {"text": RE_TEXT, "head_start": 0, "head_end": 5}, None, AUTH),
    (
        "POST",
        "/extract",
        {"text": "bob jones at london with the knicks"},
        {"image": ("p.jpg", PHOTO, "image/jpeg")},
        AUTH,
    ),
    ("POST", "/ner", {"text": "   "}, None, AUTH),
    ("POST", "/ner", {"text": "x " * 1500}, None, AUTH),
    ("POST", "/ner", {"text": "paris"}, {"image": ("notes.txt", b"not a picture", "text/plain")}, AUTH),
    ("POST", "/ner", {"text": "paris"}, {"image": ("p.jpg", PHOTO[: len(PHOTO) // 2], "image/jpeg")}, AUTH),
    ("POST", "/ner", {"text": "paris"}, {"image": ("big.jpg", b"\xff" * 500_000, "image/jpeg")}, AUTH),
    ("POST", "/ner", {"text": "paris"}, None, {}),
    ("POST", "/ner", {"text": "paris"}, None, {"Authorization": "Bearer wrong"}),
    ("GET", "/health", {}, None, {}),
    ("GET", "/ready", {}, None, {}),
    ("GET", "/nowhere", {}, None, {}),
]


def answer_of(url: str, method: str, path: str, data: dict, files: dict | None, headers: dict) -> tuple:
    """Status, body without its request id (each server draws its own), and the Retry-After."""
    if method == "GET":
        answer = httpx.get(f"{url}{path}", headers=headers, timeout=CLIENT_TIMEOUT_S)
    else:
        answer = httpx.post(f"{url}{path}", data=data, files=files, headers=headers, timeout=CLIENT_TIMEOUT_S)
    body = answer.json()
    if isinstance(body, dict) and "detail" in body:  # an error: it names its request
        assert body.pop("request_id") == answer.headers["x-request-id"]
    return answer.status_code, body, answer.headers.get("retry-after")


def test_answers_and_errors_equal_python_m_service(two_replicas, single_process):
    statuses = []
    for method, path, data, files, headers in REQUESTS:
        expected = answer_of(single_process, method, path, data, files, headers)
        assert answer_of(two_replicas.url, method, path, data, files, headers) == expected, (path, data)
        statuses.append(expected[0])
    # The list above covers answers and each error the service gives.
    assert statuses == [200, 200, 200, 200, 422, 422, 200, 422, 413, 415, 422, 413, 401, 401, 200, 200, 404]


def test_headers_and_metric_names_are_the_service_s(two_replicas, single_process):
    request_id = "ray-check-1"
    answer = httpx.post(
        f"{two_replicas.url}/ner",
        data={"text": TEXT},
        headers={**AUTH, "X-Request-ID": request_id},
        timeout=30,
    )
    assert answer.status_code == 200
    assert answer.headers.get_list("x-request-id") == [request_id]  # once, though Serve's proxy adds it too
    assert [part.split(";")[0] for part in answer.headers["server-timing"].split(", ")] == [
        "tokenise",
        "queue_wait",
        "inference",
        "total",
    ]
    assert answer.headers["x-serve-replica"].startswith(f"SERVE_REPLICA::{APP}#{DEPLOYMENT_NAME}#")

    def metric_names(url: str) -> set[str]:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}

    names = metric_names(two_replicas.url)
    assert {"imm_requests_total", "imm_stage_seconds", "imm_batch_size", "imm_model_info"} <= names
    assert names == metric_names(single_process)


# --- across nodes ------------------------------------------------------------------------------


def test_requests_reach_replicas_on_both_nodes(two_replicas):
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2
    answers = [post(two_replicas.url, "/ner", {"text": f"alice in paris {n}"}) for n in range(24)]
    assert [a.status_code for a in answers] == [200] * len(answers)
    # Each connection lands on one of the two proxies, which prefers the replica of its own node.
    assert {a.headers["x-serve-node"] for a in answers} == nodes
    assert len({a.headers["x-serve-replica"] for a in answers}) == 2


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None  # None: no answer (connection error or client timeout)
    replica: str | None
    error: str | None = None  # the body of an error, or the client's exception


class Load:
    """``concurrency`` clients sending /ner with a photo, each on a new connection, until stopped."""

    def __init__(self, url: str, concurrency: int):
        self.url = url
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(concurrency)
        ]
        self.photo = jpeg_bytes(1200, 900, seed=5, quality=60)

    def _client(self, number: int) -> None:
        sent = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                answer = post(
                    self.url,
                    "/ner",
                    {"text": f"bob jones in london {number} {sent}"},
                    {"image": ("p.jpg", self.photo)},
                )
                status, replica = answer.status_code, answer.headers.get("x-serve-replica")
                error = None if status == 200 else answer.text[:200]
            except httpx.TransportError as failure:
                status, replica, error = None, None, repr(failure)
            self.outcomes.append(Outcome(started, time.monotonic(), status, replica, error))
            sent += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT_S + 5)


def test_a_killed_replica_costs_its_requests_in_flight_and_is_replaced(two_replicas):
    before = set(two_replicas.replica_actors())
    assert len(before) == 2
    victim = sorted(before)[0]
    concurrency = 4
    with Load(two_replicas.url, concurrency) as load:
        time.sleep(2)  # under load
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        replaced_in = wait_until(
            lambda: two_replicas.running(2) and set(two_replicas.replica_actors()) - before != set(),
            60,
            "a new replica replaced the killed one",
        )
        new = (set(two_replicas.replica_actors()) - before).pop()
        wait_until(lambda: any(o.replica == new for o in load.outcomes), 30, "the new replica answered")
    failed = [o for o in load.outcomes if o.status != 200]
    # The victim was serving: it answered during the load, before it was killed.
    assert any(o.replica == victim for o in load.outcomes if o.ended < killed_at)
    print(
        f"\nkilled {victim} under {concurrency} clients: {len(failed)} of {len(load.outcomes)} requests "
        f"failed ({[(o.status, o.error) for o in failed]}), replaced after {replaced_in:.1f} s by {new}"
    )
    # At most the requests in flight when it died (every client had at most one), none sent after.
    assert len(failed) <= concurrency
    assert all(o.started <= killed_at for o in failed), [(o.started - killed_at, o.status) for o in failed]
    assert {o.replica for o in load.outcomes if o.status == 200} >= {new}


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(ray_serve):
    ray_serve.deploy(
        min_replicas=1,
        max_replicas=2,
        cpus_per_replica=1,
        target_ongoing_requests=1,
        upscale_delay_s=0,
        downscale_delay_s=2,
        look_back_period_s=2,
        metrics_interval_s=0.5,
        **HEALTH_CHECK,
    )
    wait_until(lambda: ray_serve.running(1), 60, "autoscaling deployment settled at one replica")
    with Load(ray_serve.url, concurrency=6) as load:
        up_in = wait_until(lambda: ray_serve.running(2), 60, "a second replica under load")
        wait_until(
            lambda: len({o.replica for o in load.outcomes if o.status == 200}) == 2, 30, "both answered"
        )
    down_in = wait_until(lambda: ray_serve.running(1), 60, "back to one replica without load")
    print(f"\nautoscaling: 1 -> 2 replicas {up_in:.1f} s into the load, 2 -> 1 {down_in:.1f} s after it")
    assert all(o.status == 200 for o in load.outcomes), {o.status for o in load.outcomes}


def test_the_kuberay_serve_config_deploys(ray_serve, service_values, single_process, tmp_path):
    """deploy/kuberay/rayservice.yaml's Serve config, deployed as it is but for the bundle paths."""
    import yaml

    config = yaml.safe_load(
        yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())["spec"]["serveConfigV2"]
    )
    (app,) = config["applications"]
    assert app["name"] == APP and app["import_path"] == "service.ray_app:build_app"
    app["runtime_env"]["env_vars"].update(
        IMM_NER_BUNDLE=str(service_values["ner_bundle"]), IMM_RE_BUNDLE=str(service_values["re_bundle"])
    )
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).with_name("serve")
    deployed = subprocess.run(
        [str(serve_cli), "run", "--non-blocking", "--address", ray_serve.cluster.address, str(path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    wait_until(
        lambda: (
            serve.status().applications[APP].status == "RUNNING"
            and ray_serve.running(app["args"]["min_replicas"])
        ),
        90,
        "the config's application running",
    )
    # The builder read the config's args and variables: no API key, batches of 16, one thread.
    answer = httpx.post(f"{ray_serve.url}/ner", data={"text": TEXT}, timeout=CLIENT_TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    expected = httpx.post(
        f"{single_process}/ner", data={"text": TEXT}, headers=AUTH, timeout=CLIENT_TIMEOUT_S
    )
    assert answer.json() == expected.json()
    assert (
        httpx.get(f"{ray_serve.url}/ready", timeout=CLIENT_TIMEOUT_S).json()
        == httpx.get(f"{single_process}/ready").json()
    )
