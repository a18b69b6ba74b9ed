"""``imm extract --ray``: the corpus on a real two-node Ray cluster (Ray Data), answered row for row
as on one machine, and no row lost when an engine actor is killed mid-run (``make test-ray``)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imm.extract import main as extract_main
from tests.ray_cluster import local_ray_cluster
from tests.test_corpus import read_lines, write_posts


def by_id_without_row_numbers(records: list[dict]) -> list[dict]:
    """One machine's records as Ray writes them: blocks are read in parallel, so a record carries its
    id but no row number (imm.extract_ray)."""
    assert all("row" in record for record in records)
    return sorted(({k: v for k, v in r.items() if k != "row"} for r in records), key=lambda r: r["id"])


try:
    import ray  # noqa: F401 - the ray extra, or the cluster fixture says it is missing
except ImportError as error:  # collected by `make test` too, which deselects these tests
    MISSING_RAY: ImportError | None = error
else:
    MISSING_RAY = None

pytestmark = pytest.mark.ray

ACTOR = "MapWorker(MapBatches(ExtractActor))"


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A head and a worker node on this machine, one CPU each, this checkout on the workers' path."""
    if MISSING_RAY is not None:
        pytest.fail(f"the ray extra is not installed (pip install -e '.[ray]'): {MISSING_RAY}")
    with local_ray_cluster(IMM_INTRA_OP_THREADS="1"):
        yield


def extract(posts: Path, out: Path, models: Path, *more: str) -> int:
    return extract_main(
        [
            str(posts),
            "--out",
            str(out),
            "--models",
            str(models),
            "--id-column",
            "id",
            "--task",
            "extract",
            *more,
        ]
    )


def actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ACTOR.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_the_cluster_answers_row_for_row_as_one_machine(cluster, models, tmp_path, capsys):
    posts = tmp_path / "posts.jsonl"
    write_posts(posts, 300, seed=5)
    assert extract(posts, tmp_path / "one.jsonl", models) == 0
    assert extract(posts, tmp_path / "ray.jsonl", models, "--ray", "--ray-actors", "2") == 0
    summary = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert summary["written"] == 300 and summary["ray_actors"] == 2
    one, on_ray = read_lines(tmp_path / "one.jsonl"), read_lines(tmp_path / "ray.jsonl")
    assert sorted(on_ray, key=lambda r: r["id"]) == by_id_without_row_numbers(one)


def test_a_killed_actors_rows_are_retried_and_none_lost(cluster, models, tmp_path):
    posts = tmp_path / "posts.jsonl"
    write_posts(posts, 1500, seed=6)
    assert extract(posts, tmp_path / "one.jsonl", models) == 0
    killed: list[int] = []

    def kill_one_actor_mid_run() -> None:
        out = tmp_path / "ray.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 2000):
            time.sleep(0.01)  # some rows are answered: the actors are busy
        pids = actor_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_one_actor_mid_run)
    killer.start()
    assert extract(posts, tmp_path / "ray.jsonl", models, "--ray", "--ray-actors", "2") == 0
    killer.join()
    assert killed, "no actor was found to kill"
    on_ray, one = read_lines(tmp_path / "ray.jsonl"), read_lines(tmp_path / "one.jsonl")
    assert len({r["id"] for r in on_ray}) == len(on_ray) == 1500
    assert sorted(on_ray, key=lambda r: r["id"]) == by_id_without_row_numbers(one)
