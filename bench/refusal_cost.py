"""What one refusal costs the server: CPU per early 503, with its model's queue held full.

Serves ``python -m service``'s app in this process (uvicorn with the service's protocol class, the
installed HTTP parser and loop: refusals are answered at the connection layer) on a loopback port, holds the NER model inside its call so that its queue stays full (``IMM_MAX_QUEUE=1``,
one inference worker), then lets wrk post small ``/ner`` forms for ``--seconds``: every one is refused
before its body is parsed. Reports refusals per second and this process's CPU time per refusal::

    python bench/refusal_cost.py                     # weights/ner, 8 s, 16 connections

``--floors`` also measures, in the same process and alternating with the service's refusals, what
any Python server on the same event loop pays per answer: ``bare`` (an asyncio protocol that writes
a pre-built 503 for every read, no parsing) and ``parsed`` (the same after httptools has parsed the
request, one callback per message): the floor under the service's refusal path. ``--client-cpus``
pins wrk (``taskset``), ``--rounds`` repeats the alternation::

    taskset -c 0 python bench/refusal_cost.py --floors --client-cpus 1 --rounds 3
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BODY = '--b\\r\\nContent-Disposition: form-data; name=\\"text\\"\\r\\n\\r\\nalice in paris\\r\\n--b--\\r\\n'


#: The floors' answer: the size of the service's refusal (status line, JSON headers, a short detail).
FLOOR_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"x-request-id: 0123456789abcdef\r\ncontent-length: 60\r\n\r\n"
    b'{"detail":"the NER model is overloaded: retry after 1 s.   "}'
)


def bare_protocol():
    """The floor: an asyncio protocol answering every read with the pre-built 503, parsing nothing."""
    import asyncio

    class Bare(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(FLOOR_ANSWER)

    return Bare


def parsed_protocol():
    """The floor with HTTP parsing: httptools parses each request, the answer at its end."""
    import asyncio

    import httptools

    class Parsed(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data):
            self.parser.feed_data(data)

        def on_message_complete(self):
            self.transport.write(FLOOR_ANSWER)

    return Parsed


def serve_floor(factory) -> tuple[str, Callable[[], None]]:
    """Serves ``factory``'s protocol on a loopback port from a thread, on the event loop uvicorn would
    pick (uvloop where installed); returns its URL and what stops it."""
    import asyncio

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0))
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def stop() -> None:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)

    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", stop


def serve_service(bundle: Path) -> tuple[str, Callable[[], None]]:
    """The service's app on a loopback port, its NER queue held full; returns its URL and what stops it."""
    import httpx
    import uvicorn

    from engine.settings import Settings
    from service import create_app
    from service.server import protocol_class

    settings = Settings(ner_bundle=bundle, re_bundle=None, max_queue=1, max_batch_size=1, inference_workers=1)
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http=protocol_class())
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    engine = app.state.engine
    engine.loaded.wait(120)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    batcher = engine.slots["ner"].batcher
    release, run = threading.Event(), batcher.run_batch
    batcher.run_batch = lambda items: (release.wait(600), run(items))[1]
    # One request in the held call, then one queued: the queue is full.
    holders = [
        threading.Thread(
            target=httpx.post, args=(f"{url}/ner",), kwargs={"data": {"text": "x"}, "timeout": 600}
        )
        for _ in range(2)
    ]
    holders[0].start()
    while not batcher._running:
        time.sleep(0.01)
    holders[1].start()
    while batcher.depth < 1:
        time.sleep(0.01)

    def stop() -> None:
        release.set()
        for holder in holders:
            holder.join(60)
        server.should_exit = True
        thread.join(30)

    return url, stop


def drive(
    url: str, seconds: int, connections: int, client_cpus: str | None
) -> tuple[str, float, float, float]:
    """wrk posting small forms to ``url``/ner: (its output, answers/s, this process's CPU per answer in
    us, cores busy)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(
            f'wrk.method = "POST"\nwrk.body = "{BODY}"\n'
            'wrk.headers["Content-Type"] = "multipart/form-data; boundary=b"\n'
        )
        script.flush()
        pin = ["taskset", "-c", client_cpus] if client_cpus else []
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        output = subprocess.run(
            [*pin, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script.name, f"{url}/ner"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    rate = float(next(line for line in output.splitlines() if "Requests/sec" in line).split()[1])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return output, rate, cpu / elapsed / rate * 1e6, cpu / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ner-bundle", type=Path, default=ROOT / "weights" / "ner")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--floors", action="store_true", help="also measure the bare and parsed floors")
    parser.add_argument("--client-cpus", help="CPUs for wrk (taskset list, e.g. 1)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("needs wrk (apt-get install wrk)")
    if args.client_cpus and shutil.which("taskset") is None:
        parser.error("--client-cpus needs taskset (util-linux)")
    servers = {"service": lambda: serve_service(args.ner_bundle)}
    if args.floors:
        servers |= {
            "bare": lambda: serve_floor(bare_protocol()),
            "parsed": lambda: serve_floor(parsed_protocol()),
        }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in servers}
    for _ in range(args.rounds):
        for name, start in servers.items():
            url, stop = start()
            try:
                output, rate, cpu_us, busy = drive(url, args.seconds, args.connections, args.client_cpus)
            finally:
                stop()
            results[name].append((cpu_us, rate, busy))
            if name == "service" and not args.floors and args.rounds == 1:
                print(output)
            print(
                f"{name}: {busy:.2f} cores busy, {rate:.0f} answers/s, {cpu_us:.0f} us of CPU per answer",
                flush=True,
            )
    if args.floors or args.rounds > 1:
        print(
            "\n| server | CPU us per answer (median, range) | answers/s | cores busy |\n|---|---:|---:|---:|"
        )
        for name, runs in results.items():
            cpu = sorted(r[0] for r in runs)
            print(
                f"| {name} | {statistics.median(cpu):.0f} ({cpu[0]:.0f}-{cpu[-1]:.0f}) | "
                f"{min(r[1] for r in runs):,.0f}-{max(r[1] for r in runs):,.0f} | "
                f"{min(r[2] for r in runs):.2f}-{max(r[2] for r in runs):.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
