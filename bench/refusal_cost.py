"""What one refusal costs the server: CPU per early 503, with its model's queue held full.

Serves ``python -m service``'s app in this process (uvicorn with the service's protocol class, the
installed HTTP parser and loop: refusals are answered at the connection layer) on a loopback port, holds the NER model inside its call so that its queue stays full (``IMM_MAX_QUEUE=1``,
one inference worker), then lets wrk post small ``/ner`` forms for ``--seconds``: every one is refused
before its body is parsed. Reports refusals per second and this process's CPU time per refusal::

    python bench/refusal_cost.py                     # weights/ner, 8 s, 16 connections
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BODY = '--b\\r\\nContent-Disposition: form-data; name=\\"text\\"\\r\\n\\r\\nalice in paris\\r\\n--b--\\r\\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ner-bundle", type=Path, default=ROOT / "weights" / "ner")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("needs wrk (apt-get install wrk)")
    import httpx
    import uvicorn

    from engine.settings import Settings
    from service import create_app
    from service.server import protocol_class

    settings = Settings(
        ner_bundle=args.ner_bundle, re_bundle=None, max_queue=1, max_batch_size=1, inference_workers=1
    )
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
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(
            f'wrk.method = "POST"\nwrk.body = "{BODY}"\n'
            'wrk.headers["Content-Type"] = "multipart/form-data; boundary=b"\n'
        )
        script.flush()
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        output = subprocess.run(
            ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "-s", script.name, f"{url}/ner"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    release.set()
    for holder in holders:
        holder.join(60)
    server.should_exit = True
    thread.join(30)
    rate = float(next(line for line in output.splitlines() if "Requests/sec" in line).split()[1])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(output)
    print(
        f"server: {cpu / elapsed:.2f} cores busy, {rate:.0f} refusals/s, "
        f"{cpu / elapsed / rate * 1e6:.0f} us of CPU per refusal"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
