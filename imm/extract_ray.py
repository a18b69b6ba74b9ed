"""``imm extract --ray [ADDRESS]``: the corpus on a Ray cluster, with Ray Data.

The input is read by Ray Data (``read_json`` / ``read_csv`` / ``read_parquet``) into blocks spread
over the cluster; ``map_batches`` sends them to a pool of ``--ray-actors`` actors, each holding
the engine (``imm.load_async``) on its own event loop, which answer a batch's rows concurrently
(the engine batches them) exactly as ``imm extract`` does on one machine; the answers come back
to this process, which writes them with the same sinks, so the output, ``--resume`` and the
summary are those of the one-machine run. Rows already in ``--out`` are filtered out before any
actor sees them. An actor that dies (a killed process, a lost node) is restarted by Ray and its
batch retried, so no row is lost; a row is written once, when its answer arrives.

The input file, ``--images`` and ``--models`` must be readable at the same paths on every node (a
shared file system, or the same image), and the rows need ids (a column called ``id``, or
``--id-column``: blocks are read in parallel, so a row's number is not known to the node that reads
it). docs/scaling.md has the
commands for a real cluster and KubeRay's ``RayJob``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

from imm.api import shortest_first
from imm.corpus import (
    DEFAULT_ID_COLUMN,
    Row,
    UsageError,
    answer,
    input_format,
    model_options,
    open_output,
    resolve_columns,
)

# Rows per actor call: enough for the engine to fill its batches of like lengths (the call's rows
# go shortest first), few enough to spread the work; all in flight at once within the engine's queue.
ROWS_PER_CALL = 128


class ExtractActor:
    """One engine on a Ray actor: a batch of rows in, their records (JSON text) out."""

    def __init__(self, settings: dict[str, Any]):
        import imm

        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.nlp = self.loop.run_until_complete(imm.load_async(settings["models"], **settings["options"]))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        s = self.settings
        ids = batch[s["id_column"]]
        rows = [
            Row(
                id=str(ids[i]),
                text=batch[s["text_column"]][i],
                image=batch[s["image_column"]][i] if s["image_column"] else None,
                head=batch["head"][i] if "head" in batch else None,
                tail=batch["tail"][i] if "tail" in batch else None,
            )
            for i in range(len(ids))
        ]
        records = self.loop.run_until_complete(self._answer_all(rows))
        return {"record": [json.dumps(record, ensure_ascii=False) for record in records]}

    async def _answer_all(self, rows: list[Row]) -> list[dict[str, Any]]:
        s = self.settings
        images = Path(s["images"]) if s["images"] else None
        tasks: list[asyncio.Task] = [None] * len(rows)  # type: ignore[list-item]
        for index in shortest_first(self.nlp, [row.text for row in rows]):
            tasks[index] = asyncio.ensure_future(answer(self.nlp, s["task"], rows[index], images, s["pairs"]))
        return await asyncio.gather(*tasks)


def read_dataset(path: Path):
    import ray.data

    fmt = input_format(path)
    reader = {"json": ray.data.read_json, "csv": ray.data.read_csv, "parquet": ray.data.read_parquet}[fmt]
    # Reading is I/O: it reserves no CPU, which the engine actors hold (else, with every CPU taken
    # by an actor, the reads that feed them could never be scheduled).
    return reader(str(path.resolve()), ray_remote_args={"num_cpus": 0})


def run_on_ray(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from tqdm import tqdm

    if not ray.is_initialized():
        ray.init(address=args.ray or None, log_to_driver=False)
    chosen = resolve_columns(args)  # the same columns, notes and refusals as the one-machine run
    if chosen.id is None:
        raise UsageError(
            f"--ray needs an id column (--id-column, or one called {DEFAULT_ID_COLUMN!r}): blocks are "
            "read in parallel, so rows have no number"
        )
    args.id_column, args.image_column = chosen.id, chosen.image
    sink = open_output(args, chosen)
    started = time.perf_counter()
    errors: collections.Counter[str] = collections.Counter()
    written = 0
    try:
        dataset = read_dataset(args.input)
        total = dataset.count()
        done = set(sink.done)
        id_column = args.id_column
        if done:
            dataset = dataset.filter(lambda row: str(row[id_column]) not in done, num_cpus=0)
        settings = {
            "models": str(Path(args.models).resolve()),
            "options": model_options(args),
            "task": args.task,
            "pairs": args.pairs,
            "images": str(args.images.resolve()) if args.images else None,
            "text_column": args.text_column,
            "image_column": args.image_column,
            "id_column": id_column,
        }
        answered = dataset.map_batches(
            ExtractActor,
            fn_constructor_kwargs={"settings": settings},
            batch_size=ROWS_PER_CALL,
            concurrency=args.ray_actors,
            num_cpus=args.ray_cpus_per_actor,
        )  # Ray Data's actor pools restart a killed actor and retry its batch (tested)
        bar = tqdm(total=total - len(done), unit="rows", desc="extracting", disable=None, file=sys.stderr)
        for batch in answered.iter_batches(batch_size=ROWS_PER_CALL, batch_format="numpy"):
            records = [json.loads(text) for text in batch["record"]]
            fresh = [record for record in records if record["id"] not in sink.done]
            sink.done.update(record["id"] for record in fresh)
            for record in fresh:
                if "error" in record:
                    errors[record["error"]["kind"]] += 1
            sink.write(fresh)
            written += len(fresh)
            bar.update(len(fresh))
        bar.close()
    finally:
        sink.close()
    seconds = time.perf_counter() - started
    return {
        "rows": total,
        "written": written,
        "skipped_already_done": len(done),
        "errors": dict(errors),
        "seconds": round(seconds, 2),
        "rows_per_second": round(written / seconds, 1) if seconds else None,
        "out": str(args.out),
        "ray_actors": args.ray_actors,
    }
