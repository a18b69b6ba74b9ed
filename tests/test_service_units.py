"""Service parts that need no model: the batcher, the guard, settings, providers, error answers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import httpx
import pytest
from fastapi import FastAPI, Request

from engine import DeadlineExceeded, Overloaded
from engine.batcher import Batcher
from engine.pipeline import entity_words
from engine.runtimes import CPU, CUDA, ProviderError, select_providers
from engine.settings import Settings
from model.preprocessing import split_words
from service.errors import install_error_handlers
from service.guard import GuardMiddleware
from service.observability import Metrics, RequestContextMiddleware


async def _until(condition, timeout: float = 5.0) -> None:
    """Waits (yielding to the loop) until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


# --- batcher ----------------------------------------------------------------------------------


def test_batcher_gathers_concurrent_requests_and_answers_each_with_its_own_row():
    from concurrent.futures import ThreadPoolExecutor

    sizes: list[int] = []

    def run_batch(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return [item * 10 for item in items]

    async def scenario() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(run_batch, pool, max_batch_size=8, max_wait_s=0.05, max_queue=64)
            batcher.start()
            try:

                async def one(value: int) -> int:
                    with batcher.incoming():
                        await asyncio.sleep(0)  # "preprocessing"
                    result, timings = await batcher.submit(value)
                    assert timings.batch_size >= 1
                    return result

                return await asyncio.gather(*(one(v) for v in range(20)))
            finally:
                await batcher.stop()

    results = asyncio.run(scenario())
    assert results == [v * 10 for v in range(20)]
    assert sum(sizes) == 20 and max(sizes) > 1 and max(sizes) <= 8


def test_batcher_full_queue_refuses_at_once_and_failures_stay_in_their_batch():
    from concurrent.futures import ThreadPoolExecutor

    entered, release = threading.Event(), threading.Event()

    def run_batch(items: Sequence[str]) -> list[str]:
        if "boom" in items:
            raise RuntimeError("model failed")
        entered.set()
        release.wait(5)
        return [item.upper() for item in items]

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(run_batch, pool, max_batch_size=1, max_wait_s=0, max_queue=2)
            batcher.start()
            try:
                first = asyncio.create_task(batcher.submit("a"))
                await asyncio.to_thread(entered.wait, 5)  # "a" is running, the queue is empty
                queued = [asyncio.create_task(batcher.submit(x)) for x in ("b", "c")]
                await _until(lambda: batcher.depth == 2)
                with pytest.raises(Overloaded):
                    await batcher.submit("d")
                with pytest.raises(Overloaded), batcher.incoming():
                    pass
                release.set()
                result, timings = await first
                assert result == "A" and timings.batch_size == 1 and timings.inference_s > 0
                assert [(await q)[0] for q in queued] == ["B", "C"]
                with pytest.raises(RuntimeError, match="model failed"):
                    await batcher.submit("boom")
                assert (await batcher.submit("e"))[0] == "E"  # the worker survived
            finally:
                release.set()
                await batcher.stop()

    asyncio.run(scenario())


def test_batcher_with_two_workers_runs_two_calls_at_once_and_fills_the_next_batch_meanwhile():
    from concurrent.futures import ThreadPoolExecutor

    running, peak, calls = 0, 0, []
    lock, both_in, release = threading.Lock(), threading.Event(), threading.Event()

    def run_batch(items: Sequence[str]) -> list[str]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            calls.append(list(items))
            if running == 2:
                both_in.set()
        release.wait(5)
        with lock:
            running -= 1
        return [item.upper() for item in items]

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as pool:
            batcher = Batcher(run_batch, pool, max_batch_size=2, max_wait_s=0, max_queue=64, workers=2)
            batcher.start()
            try:
                first = [asyncio.create_task(batcher.submit(x)) for x in ("a", "b")]
                await _until(lambda: len(calls) == 1)
                second = [asyncio.create_task(batcher.submit(x)) for x in ("c", "d")]
                await asyncio.to_thread(both_in.wait, 5)  # the second call started, the first still runs
                third = [asyncio.create_task(batcher.submit(x)) for x in ("e", "f")]
                await _until(lambda: batcher.depth == 2)  # every worker busy: the third batch waits
                release.set()
                answers = [(await task)[0] for task in (*first, *second, *third)]
            finally:
                release.set()
                await batcher.stop()
        assert answers == ["A", "B", "C", "D", "E", "F"]
        assert peak == 2 and calls == [["a", "b"], ["c", "d"], ["e", "f"]]

    asyncio.run(scenario())


def test_batcher_overload_state_holds_through_a_drained_batch_while_requests_are_refused():
    """Hysteresis, on a stand-in model held by permits (counted, never timed): the overload state's
    own admission empties the queue now and then; a batch that leaves it empty ends the state only
    when nothing was refused for overload since the batch before began, nor for
    ``overload_after_s``."""
    from concurrent.futures import ThreadPoolExecutor

    permits = threading.Semaphore(0)
    calls: list[list[str]] = []

    def run_batch(items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        assert permits.acquire(timeout=10)
        return [item.upper() for item in items]

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(
                run_batch,
                pool,
                max_batch_size=2,
                max_wait_s=0,
                max_queue=2,
                overload_wait_s=1e-6,
                overload_after_s=0.0,
            )
            batcher.start()
            try:
                first = asyncio.create_task(batcher.submit("a"))
                await _until(lambda: calls == [["a"]])
                single = asyncio.create_task(batcher.submit("b"))
                group = asyncio.create_task(batcher.submit_group(["c1", "c2"]))  # does not fit with b
                await _until(lambda: batcher.depth == 2)
                permits.release()
                await _until(lambda: calls[-1] == ["b"])  # began with the group still waiting: standing
                assert not batcher.overloaded
                group.cancel()  # a caller gives up on the standing queue
                await _until(lambda: batcher.overloaded)
                queued = {x: asyncio.create_task(batcher.submit(x)) for x in "de"}
                await _until(lambda: batcher.depth == 2)
                with pytest.raises(Overloaded, match="queue is full"):
                    batcher.check_admission()  # refused for overload while b runs
                permits.release()
                await _until(lambda: calls[-1] == ["d", "e"])
                assert batcher.depth == 0  # the batch left the queue empty, right after a refusal:
                assert batcher.overloaded  # the state holds (it used to end here, and flap)
                batcher.check_admission()  # with the queue empty, what starts within a call is admitted
                later = asyncio.create_task(batcher.submit("f"))
                await _until(lambda: batcher.depth == 1)
                batcher.overload_after_s = 3600.0  # the quiet while the state also needs
                permits.release()
                await _until(lambda: calls[-1] == ["f"])
                assert batcher.depth == 0 and batcher.overloaded
                batcher.overload_after_s = 0.0
                last = asyncio.create_task(batcher.submit("g"))
                await _until(lambda: batcher.depth == 1)
                permits.release()
                await _until(lambda: calls[-1] == ["g"])
                assert not batcher.overloaded  # drained, no refusal since the batch before, quiet
                permits.release()
                answers = [(await task)[0] for task in (first, single, queued["d"], queued["e"], later, last)]
                assert answers == ["A", "B", "D", "E", "F", "G"]
                assert ["c1", "c2"] not in calls  # the caller who gave up was never computed for
            finally:
                for _ in range(8):
                    permits.release()
                await batcher.stop()

    asyncio.run(scenario())


def test_batcher_overload_mode_needs_a_standing_queue_and_a_caller_who_gave_up():
    """A queue that stays non-empty is not enough: patient callers keep it. Once a caller gives up on
    a standing queue, only what can start within about one call is admitted; an emptied queue ends it."""
    from concurrent.futures import ThreadPoolExecutor

    permits = threading.Semaphore(0)

    def run_batch(items: Sequence[str]) -> list[str]:
        assert permits.acquire(timeout=10)
        return [item.upper() for item in items]

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(
                run_batch,
                pool,
                max_batch_size=1,
                max_wait_s=0,
                max_queue=64,
                overload_wait_s=1e-6,
                overload_after_s=0.0,
            )
            batcher.start()
            try:
                first = asyncio.create_task(batcher.submit("a"))
                await _until(lambda: len(batcher._running) == 1)
                queued = {x: asyncio.create_task(batcher.submit(x)) for x in "bcde"}
                await _until(lambda: batcher.depth == 4)
                permits.release()  # "a" ends; "b" starts with c, d, e still waiting: a standing queue
                assert (await first)[0] == "A"
                await _until(lambda: batcher.depth == 3)
                assert not batcher.overloaded
                batcher.check_admission()  # patient callers: admitted
                queued["e"].cancel()  # a caller gives up
                await _until(lambda: batcher.depth == 2)
                assert batcher.overloaded
                with pytest.raises(Overloaded, match="overloaded"):
                    batcher.check_admission()  # two calls' rows ahead: more than one call's wait
                for _ in "bcd":
                    permits.release()
                assert [(await queued[x])[0] for x in "bcd"] == ["B", "C", "D"]
                permits.release()
                assert (await batcher.submit("f"))[0] == "F"  # a batch that left the queue empty
                assert not batcher.overloaded
                batcher.check_admission()
            finally:
                for _ in range(8):
                    permits.release()
                await batcher.stop()

    asyncio.run(scenario())


def test_batcher_a_request_that_raises_fails_alone_not_its_batch_mates():
    from concurrent.futures import ThreadPoolExecutor

    sizes: list[int] = []

    def run_batch(items: Sequence[str]) -> list[str]:
        sizes.append(len(items))
        if any(item.startswith("boom") for item in items):
            raise RuntimeError("model failed")
        return [item.upper() for item in items]

    async def scenario() -> list[str | BaseException]:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(run_batch, pool, max_batch_size=8, max_wait_s=0.05, max_queue=64)
            batcher.start()
            try:

                async def one(value: str) -> str:
                    with batcher.incoming():
                        await asyncio.sleep(0)
                    return (await batcher.submit(value))[0]

                items = [f"item{n}" for n in range(14)] + ["boom1", "boom2"]
                return await asyncio.gather(*(one(v) for v in items), return_exceptions=True)
            finally:
                await batcher.stop()

    results = asyncio.run(scenario())
    assert results[:14] == [f"ITEM{n}" for n in range(14)]
    assert all(isinstance(r, RuntimeError) for r in results[14:])
    assert max(sizes) > 1  # the failing requests were batched with others, which were answered


def test_batcher_drops_requests_that_timed_out_while_queued():
    from concurrent.futures import ThreadPoolExecutor

    seen: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def run_batch(items: Sequence[str]) -> list[str]:
        seen.extend(items)
        entered.set()
        release.wait(5)
        return list(items)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(
                run_batch,
                pool,
                max_batch_size=4,
                max_wait_s=0,
                max_queue=4,
                on_drop=lambda reason, rows: dropped.append((reason, rows)),
            )
            batcher.start()
            try:
                first = asyncio.create_task(batcher.submit("a"))
                await asyncio.to_thread(entered.wait, 5)
                with pytest.raises(DeadlineExceeded):
                    await batcher.submit("late", deadline=time.monotonic() + 0.01)
                assert dropped == [("deadline", 1)]
                release.set()
                await first
                assert (await batcher.submit("b"))[0] == "b"
            finally:
                release.set()
                await batcher.stop()

    dropped: list[tuple[str, int]] = []
    asyncio.run(scenario())
    assert seen == ["a", "b"]


def test_batcher_an_idle_model_takes_a_request_its_stale_estimates_would_refuse():
    """Estimates learned in a busier moment (a call of at least 1 s) must not lock every request with
    a shorter deadline out, or none would get through to renew them: an idle model admits and runs
    it; a busy one refuses it at once."""
    from concurrent.futures import ThreadPoolExecutor

    slow = threading.Event()
    release = threading.Event()

    def run_batch(items: Sequence[str]) -> list[str]:
        if slow.is_set():
            time.sleep(1.0)  # the busier moment: a call of at least a second
            slow.clear()
        else:
            release.wait(10)
        return [item.upper() for item in items]

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(run_batch, pool, max_batch_size=4, max_wait_s=0, max_queue=8)
            batcher.start()
            try:
                slow.set()
                assert (await batcher.submit("a"))[0] == "A"
                assert batcher._call_seconds >= 1.0
                release.set()
                deadline = time.monotonic() + 0.9  # shorter than the one call the estimates know
                batcher.check_admission(deadline)  # idle: admitted
                assert (await batcher.submit("b", deadline))[0] == "B"  # and run, not dropped
                release.clear()
                running = asyncio.create_task(batcher.submit("c"))
                await _until(lambda: len(batcher._running) == 1)
                with pytest.raises(Overloaded, match="past its deadline"):
                    batcher.check_admission(time.monotonic() + 0.9)  # busy: the estimates hold
                release.set()
                assert (await running)[0] == "C"
            finally:
                release.set()
                await batcher.stop()

    asyncio.run(scenario())


def test_batcher_a_deadline_allows_for_calls_longer_than_the_average():
    """Calls of uneven length: a request whose deadline the average call would meet, but not one
    as long as the recent longer ones, is refused while the model is busy (it would be answered
    late); one with room for two average deviations more is admitted."""
    from concurrent.futures import ThreadPoolExecutor

    lengths = iter([0.0, 0.3, 0.0, 0.3, 0.0, 0.3])
    release = threading.Event()

    def run_batch(items: Sequence[str]) -> list[str]:
        seconds = next(lengths, None)
        if seconds is None:
            release.wait(10)  # the busy model the admission is asked about
        else:
            time.sleep(seconds)
        return list(items)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(run_batch, pool, max_batch_size=1, max_wait_s=0, max_queue=8)
            batcher.start()
            try:
                for item in "abcdef":
                    await batcher.submit(item)
                running = asyncio.create_task(batcher.submit("busy"))
                await _until(lambda: len(batcher._running) == 1)
                room = batcher.expected_wait_s() + batcher._call_seconds
                assert batcher._call_bound > batcher._call_seconds + 0.1  # the deviation is learned
                with pytest.raises(Overloaded, match="past its deadline"):
                    batcher.check_admission(time.monotonic() + room + 0.05)
                batcher.check_admission(time.monotonic() + room + 2 * batcher._call_deviation + 0.05)
                release.set()
                await running
            finally:
                release.set()
                await batcher.stop()

    asyncio.run(scenario())


def _held_batcher_scenario(max_batch_size: int, queued) -> tuple[list, list[list[str]]]:
    """Runs "a" (held in the model until all else is queued), queues ``queued`` (items or lists:
    groups) behind it, then lets the worker go. The model upper-cases its items and fails a batch
    holding "boom". Returns each request's result or exception, and the batches the model ran."""
    from concurrent.futures import ThreadPoolExecutor

    batches: list[list[str]] = []
    entered, release = threading.Event(), threading.Event()

    def run_batch(items: Sequence[str]) -> list[str]:
        batches.append(list(items))
        entered.set()
        release.wait(5)
        if "boom" in items:
            raise RuntimeError("model failed")
        return [item.upper() for item in items]

    async def scenario() -> list:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(run_batch, pool, max_batch_size=max_batch_size, max_wait_s=0, max_queue=64)
            batcher.start()
            try:
                first = asyncio.create_task(batcher.submit("a"))
                await asyncio.to_thread(entered.wait, 5)
                tasks = [
                    asyncio.create_task(
                        batcher.submit_group(request)
                        if isinstance(request, list)
                        else batcher.submit(request)
                    )
                    for request in queued
                ]
                await _until(lambda: batcher.depth == len(queued))
                release.set()
                await first
                answers = await asyncio.gather(*tasks, return_exceptions=True)
                return [a if isinstance(a, BaseException) else a[0] for a in answers]
            finally:
                release.set()
                await batcher.stop()

    return asyncio.run(scenario()), batches


def test_batcher_runs_a_group_in_one_batch_never_split_and_answers_it_together():
    groups = [["g1", "g2", "g3"], ["h1", "h2"], "s1", [f"o{n}" for n in range(10)], "s2"]
    results, batches = _held_batcher_scenario(4, groups)
    assert results == [["G1", "G2", "G3"], ["H1", "H2"], "S1", [f"O{n}" for n in range(10)], "S2"]
    assert batches == [
        ["a"],
        ["g1", "g2", "g3"],  # the next group does not fit beside it: it opens the next batch
        ["h1", "h2", "s1"],
        # A group larger than max_batch_size runs alone, in consecutive batches of max_batch_size.
        ["o0", "o1", "o2", "o3"],
        ["o4", "o5", "o6", "o7"],
        ["o8", "o9"],
        ["s2"],
    ]


def test_batcher_a_failing_item_fails_its_group_alone():
    results, batches = _held_batcher_scenario(8, [["x1", "boom", "x3"], "y", ["z1", "z2"]])
    assert isinstance(results[0], RuntimeError) and results[1:] == ["Y", ["Z1", "Z2"]]
    # The batch failed, then ran item by item: the group stops at its first failure.
    assert batches == [["a"], ["x1", "boom", "x3", "y", "z1", "z2"], ["x1"], ["boom"], ["y"], ["z1"], ["z2"]]


# --- guard: API key and upload limit ------------------------------------------------------------


def _guarded_app(max_body_bytes: int = 1000, api_key: str | None = None) -> tuple[FastAPI, dict]:
    """A bare app behind the guard; ``seen`` records how much of the body the endpoint got."""
    seen: dict = {"bodies": 0}
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/ner")
    async def ner(request: Request) -> dict:
        body = await request.body()
        seen["bodies"] += 1
        return {"bytes": len(body)}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internals /etc/passwd")

    app.add_middleware(GuardMiddleware, paths=("/ner",), max_body_bytes=max_body_bytes, api_key=api_key)
    app.add_middleware(RequestContextMiddleware, metrics=Metrics(), endpoints=("/ner", "/health"))
    return app, seen


def _call(app: FastAPI, method: str, url: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(go())


def test_guard_refuses_a_declared_oversized_body_without_reading_it():
    app, seen = _guarded_app(max_body_bytes=1000)
    pulled = 0

    async def body():
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"x" * 100

    answer = _call(app, "POST", "/ner", content=body(), headers={"content-length": "10000"})
    assert answer.status_code == 413
    assert "limit of 1000 bytes" in answer.json()["detail"]
    assert answer.headers["x-request-id"] == answer.json()["request_id"]
    assert pulled == 0 and seen["bodies"] == 0


def test_guard_cuts_a_streamed_body_as_soon_as_it_passes_the_limit():
    app, seen = _guarded_app(max_body_bytes=1000)
    pulled = 0

    async def body():  # no Content-Length: chunked
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"x" * 100

    answer = _call(app, "POST", "/ner", content=body())
    assert answer.status_code == 413
    assert pulled <= 12, f"the server read {pulled} of 100 chunks"
    assert seen["bodies"] == 0
    # Within the limit, the body goes through untouched.
    assert _call(app, "POST", "/ner", content=b"y" * 1000).json() == {"bytes": 1000}


def test_api_key_is_required_on_inference_endpoints_only():
    app, _ = _guarded_app(api_key="s3cret")
    assert _call(app, "POST", "/ner", content=b"{}").status_code == 401
    wrong = _call(app, "POST", "/ner", content=b"{}", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert (
        _call(app, "POST", "/ner", content=b"{}", headers={"Authorization": "Basic s3cret"}).status_code
        == 401
    )
    assert (
        _call(app, "POST", "/ner", content=b"{}", headers={"Authorization": "Bearer s3cret"}).status_code
        == 200
    )
    assert _call(app, "GET", "/health").status_code == 200


def test_unexpected_errors_answer_a_generic_500_with_the_request_id_and_no_traceback():
    app, _ = _guarded_app()
    answer = _call(app, "GET", "/boom", headers={"X-Request-ID": "abc-123"})
    assert answer.status_code == 500
    assert answer.json() == {"detail": "internal server error", "request_id": "abc-123"}
    assert answer.headers["x-request-id"] == "abc-123"
    assert "Traceback" not in answer.text and "passwd" not in answer.text
    # A request id that could forge log lines is replaced.
    odd = _call(app, "GET", "/health", headers={"X-Request-ID": "a b\nfake"})
    assert odd.headers["x-request-id"] != "a b\nfake" and len(odd.headers["x-request-id"]) == 32


def test_a_bug_in_a_route_of_the_real_app_is_a_json_500_with_its_request_id():
    """Inside FastAPI's stack Starlette answers an unexpected exception itself: the app's handler
    makes that answer the API's JSON (without it Starlette sends plain text)."""
    from service import create_app

    app = create_app(Settings(ner_bundle="", re_bundle="", warmup=False))

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug; /etc/passwd")

    answer = _call(app, "GET", "/bug", headers={"X-Request-ID": "bug-1"})
    assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"detail": "internal server error", "request_id": "bug-1"}


# --- settings and providers ------------------------------------------------------------------


def test_settings_come_from_imm_environment_variables(monkeypatch):
    monkeypatch.setenv("IMM_NER_BUNDLE", "/models/ner")
    monkeypatch.setenv("IMM_RE_BUNDLE", "")
    monkeypatch.setenv("IMM_PORT", "9001")
    monkeypatch.setenv("IMM_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("IMM_API_KEY", "s3cret-key")
    settings = Settings()
    assert str(settings.ner_bundle) == "/models/ner" and settings.re_bundle is None
    assert settings.port == 9001 and settings.max_batch_size == 4
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret-key"
    assert "s3cret" not in repr(settings)
    monkeypatch.setenv("IMM_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()


def _cgroup(root, self_cgroup: str, files: dict[str, str]):
    """A cgroup tree under ``root`` (``files``: path -> content) and the process's cgroup file."""
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    (root / "self").write_text(self_cgroup)
    return root, root / "self"


def test_the_cgroup_cpu_quota_is_the_tightest_on_the_way_to_the_root(tmp_path):
    from engine.settings import cgroup_cpu_quota

    v2 = {"cpu.max": "max 100000\n", "pods/a/cpu.max": "max 100000\n", "pods/cpu.max": "150000 100000\n"}
    assert cgroup_cpu_quota(*_cgroup(tmp_path / "v2", "0::/pods/a\n", v2)) == 1.5  # the parent's
    unlimited = {"cpu.max": "max 100000\n"}
    assert cgroup_cpu_quota(*_cgroup(tmp_path / "free", "0::/\n", unlimited)) is None
    # A container sees its own cgroup at the root of the mount, not at the path the host names.
    inside = {"cpu.max": "50000 100000\n"}
    assert cgroup_cpu_quota(*_cgroup(tmp_path / "ns", "0::/docker/abc\n", inside)) == 0.5
    v1 = {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    }
    v1_lines = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cgroup_cpu_quota(*_cgroup(tmp_path / "v1", v1_lines, v1)) == 2.0
    v1_free = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert cgroup_cpu_quota(*_cgroup(tmp_path / "v1free", "2:cpu:/\n", v1_free)) is None
    assert cgroup_cpu_quota(tmp_path, tmp_path / "no-such-file") is None


@pytest.mark.parametrize(
    ("quota", "affinity", "cores", "workers", "threads", "preprocess"),
    [
        ("100000 100000", range(8), 1, 1, 1, 1),  # a 1-CPU container on an 8-CPU machine
        ("150000 100000", range(8), 1, 1, 1, 1),  # 1.5 CPUs run as one core
        ("max 100000", [0], 1, 1, 1, 1),  # taskset -c 0
        ("400000 100000", range(8), 4, 2, 2, 4),
        ("max 100000", range(2), 2, 2, 1, 2),
    ],
)
def test_sizes_follow_the_cgroup_quota_and_the_affinity_mask(
    tmp_path, monkeypatch, quota, affinity, cores, workers, threads, preprocess
):
    import os

    from engine import settings as settings_module
    from engine.runtimes import inference_workers, intra_op_threads
    from service.server import sizing

    root, self_cgroup = _cgroup(tmp_path, "0::/service\n", {"service/cpu.max": quota})
    monkeypatch.setattr(settings_module, "CGROUP_ROOT", root)
    monkeypatch.setattr(settings_module, "SELF_CGROUP", self_cgroup)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity))
    settings = Settings(ner_bundle=None, re_bundle=None, runtime="onnx", providers="cpu")
    assert settings_module.available_cores() == cores
    assert (inference_workers(settings), intra_op_threads(settings)) == (workers, threads)
    assert settings.preprocess_workers == preprocess
    assert settings.inference_nice_levels == (10 if cores == 1 else 0)  # one core: the loop goes first
    assert Settings(ner_bundle=None, re_bundle=None, inference_nice=3).inference_nice_levels == 3
    assert sizing(settings).startswith(f"sizing: {cores} core(s) to use")


def test_an_inference_thread_runs_the_given_nice_levels_below_the_process():
    import os
    from concurrent.futures import ThreadPoolExecutor

    from engine.models import lower_thread_priority

    def own_priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = own_priority()
    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(3,)) as lowered:
        assert lowered.submit(own_priority).result() == min(19, before + 3)
    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(0,)) as unchanged:
        assert unchanged.submit(own_priority).result() == before
    assert own_priority() == before  # the calling thread keeps its own


def test_the_runtime_choice_names_itself_and_the_cpus_matrix_features(tmp_path, monkeypatch):
    from engine import runtimes

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_int8 amx_tile\n")
    assert runtimes.cpu_matrix_features(cpuinfo) == ["amx_int8", "avx512_vnni", "avx512f", "avx2"]
    assert runtimes.cpu_matrix_features(tmp_path / "missing") == []
    assert runtimes.runtime_choice("onnx") == ("onnx", "IMM_RUNTIME=onnx")
    monkeypatch.setattr(runtimes, "CPUINFO", cpuinfo)
    monkeypatch.setattr(runtimes, "_nvidia_driver_present", lambda: False)
    runtime, why = runtimes.runtime_choice("auto")
    assert runtime == "onnx"
    assert "no GPU" in why and "amx_int8, avx512_vnni, avx512f, avx2" in why


def test_select_providers_prefers_cuda_when_the_build_has_it():
    assert select_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert select_providers("auto", [CPU]) == [CPU]
    assert select_providers("cpu", [CUDA, CPU]) == [CPU]
    assert select_providers("cuda", [CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(ProviderError, match="CUDAExecutionProvider is not available"):
        select_providers("cuda", [CPU])


# --- RE offsets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "field", "message"),
    [
        (-1, 5, "head_start", "outside the text"),
        (0, 99, "head_end", "outside the text"),
        (5, 5, "head_end", "empty"),
        (7, 4, "head_end", "empty"),
        (5, 7, "head_start", "covers no word"),
        (1, 5, "head_start", "inside the word"),
        (0, 3, "head_end", "inside the word"),
    ],
)
def test_entity_offsets_must_be_on_the_text_and_on_word_boundaries(start, end, field, message):
    from engine import InvalidInput

    text = "Alice  \u200b went to Paris"
    with pytest.raises(InvalidInput) as caught:
        entity_words(text, split_words(text), start, end, "head")
    assert caught.value.field == field
    assert message in caught.value.message


def test_entity_offsets_map_to_word_spans_ignoring_edge_whitespace():
    text = "🎉 José  Álvarez's team, Real Madrid"
    words = split_words(text)
    start = text.index("José")
    assert entity_words(text, words, start - 1, text.index("'s"), "head") == (1, 3)
    madrid = text.index("Real")
    assert entity_words(text, words, madrid, len(text), "tail") == (len(words) - 2, len(words))


def test_every_setting_is_in_the_configuration_table_of_the_service_docs():
    from pathlib import Path

    table = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    missing = [
        f"IMM_{name.upper()}" for name in Settings.model_fields if f"`IMM_{name.upper()}`" not in table
    ]
    assert not missing, f"docs/service.md does not document {missing}"
