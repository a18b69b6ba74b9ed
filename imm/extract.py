"""``imm extract``: the entities and relations of every row of a corpus, without a server.

    imm extract posts.jsonl --out answers.jsonl                      # NER on the "text" column
    imm extract posts.csv --images pics/ --image-column image --task extract --out answers.parquet
    imm extract posts.jsonl --out answers.jsonl --resume             # after a kill: the rows left
    imm extract posts.parquet --out answers.parquet --ray auto       # on a Ray cluster (Ray Data)

Input: JSON lines, CSV or Parquet (by the file's suffix) with a text column, optionally a picture
column (a path relative to ``--images``) and an id column (``--id-column``; default: the column
``id`` where there is one, else the row's number). ``--task re``
also needs the entity pair: ``head`` and ``tail`` columns of ``[start, end]`` character offsets.
Output, by ``--out``'s suffix: JSON lines (``.jsonl``), one object per row, ``{"id", ...the API's
answer...}`` or ``{"id", "error": {"kind", "message"}}``; or Parquet (``.parquet``: a directory of
part files) with the columns ``id``, ``answer`` (the API's answer as JSON text), ``error``,
``message``. A row whose picture is missing or broken, or whose text is refused, gets its error;
the run goes on.

Every row is answered by the same engine as the server's (``imm.load_async``), up to
``--concurrency`` rows in flight, which the engine batches. Rows are read ``--sort-window`` at a
time and sent shortest first (batches of like lengths pad little); each window is written in input
order once it is answered. ``--resume`` reads what ``--out`` already holds and answers only the rest: a
partial last line (a kill in mid-write) is cut off, every complete row is kept, none is written
twice. A progress bar (rows/s) goes to stderr; a JSON summary (rows, written, skipped, errors by
kind, seconds of loading and of extraction, rows/s) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.settings import DEFAULT_WEIGHTS
from imm import DISTRIBUTION
from model.cli_help import HelpFormatter
from model.tasks import TASKS

__all__ = ["main"]

#: The id column used when ``--id-column`` is not given and the input has one.
DEFAULT_ID_COLUMN = "id"
INPUT_FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet"}


class UsageError(ValueError):
    """A bad argument or input file: one line on stderr, exit status 2."""


@dataclass
class Row:
    id: str
    text: Any
    image: str | None = None
    head: Any = None
    tail: Any = None


# --- reading ----------------------------------------------------------------------------------------


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"Parquet needs pyarrow: pip install '{DISTRIBUTION}[corpus]'") from None
    return pq


def input_format(path: Path) -> str:
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: unknown format (use {', '.join(INPUT_FORMATS)})")
    return fmt


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The input's rows as dicts, streamed."""
    fmt = input_format(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if fmt == "json":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path}:{number}: not a JSON object per line ({error.msg})") from None
                if not isinstance(record, dict):
                    raise UsageError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                yield record
    elif fmt == "csv":
        with open(path, encoding="utf-8", newline="") as handle:
            yield from csv.DictReader(handle)
    else:
        pq = _pyarrow_parquet()
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def span(value: Any, column: str, row_id: str) -> tuple[int, int]:
    """``[start, end]`` from a JSON list, or ``"start,end"`` / ``"[start, end]"`` text (CSV)."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else value.split(",")
    try:
        start, end = (int(part) for part in value)
    except (TypeError, ValueError):
        raise ValueError(f"column {column!r} must hold [start, end], not {value!r}") from None
    return start, end


def rows(args: argparse.Namespace) -> Iterator[Row]:
    id_column = args.id_column
    for number, record in enumerate(read_records(args.input)):
        if number == 0 and id_column is None and DEFAULT_ID_COLUMN in record:
            id_column = DEFAULT_ID_COLUMN
        for column in (args.text_column, id_column):
            if column is not None and column not in record:
                raise UsageError(
                    f"{args.input}: row {number} has no {column!r} column (has: {', '.join(record)[:200]})"
                )
        row_id = str(record[id_column]) if id_column else str(number)
        yield Row(
            id=row_id,
            text=record[args.text_column],
            image=record.get(args.image_column) if args.image_column else None,
            head=record.get("head"),
            tail=record.get("tail"),
        )


# --- writing ----------------------------------------------------------------------------------------


class JsonLinesSink:
    """Rows appended to a JSON lines file, flushed as written (a kill keeps every complete line)."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.done: set[str] = set()
        if path.exists() and path.stat().st_size and not resume:
            raise UsageError(f"--out {path} exists: add --resume to go on with it, or remove it")
        if resume and path.exists():
            self._recover()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run

    def _recover(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):  # a kill in mid-write: its partial line goes
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        for line in complete.splitlines():
            self.done.add(str(json.loads(line)["id"]))

    def write(self, records: list[dict[str, Any]]) -> None:
        self.handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.handle.flush()

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


class ParquetSink:
    """Rows in part files of a directory, each written whole (a temporary file, then a rename)."""

    SCHEMA_FIELDS = ("id", "answer", "error", "message")

    def __init__(self, path: Path, resume: bool, rows_per_part: int = 1000):
        pq = _pyarrow_parquet()
        self.path, self.rows_per_part = path, rows_per_part
        self.pending: list[dict[str, Any]] = []
        self.done: set[str] = set()
        parts = sorted(path.glob("part-*.parquet")) if path.is_dir() else []
        if parts and not resume:
            raise UsageError(f"--out {path} holds part files: add --resume to go on with it, or remove it")
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {path} exists and is not a directory of Parquet parts")
        for stale in path.glob(".part-*.tmp") if path.is_dir() else []:
            stale.unlink()  # a kill in mid-write
        for part in parts:
            self.done.update(str(v) for v in pq.read_table(part, columns=["id"]).column("id").to_pylist())
        self.next_part = len(parts)
        path.mkdir(parents=True, exist_ok=True)

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            error = record.get("error")
            answer = {k: v for k, v in record.items() if k not in ("id", "error")}
            self.pending.append(
                {
                    "id": record["id"],
                    "answer": None if error else json.dumps(answer, ensure_ascii=False),
                    "error": error["kind"] if error else None,
                    "message": error["message"] if error else None,
                }
            )
        if len(self.pending) >= self.rows_per_part:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(self.pending, schema=parquet_schema())
        final = self.path / f"part-{self.next_part:05d}.parquet"
        temporary = self.path / f".part-{self.next_part:05d}.tmp"
        pq.write_table(table, temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        self.next_part += 1
        self.pending = []

    def close(self) -> None:
        self._flush()


def parquet_schema():
    import pyarrow as pa

    return pa.schema([(name, pa.string()) for name in ParquetSink.SCHEMA_FIELDS])


def open_sink(path: Path, resume: bool) -> JsonLinesSink | ParquetSink:
    if path.suffix.lower() == ".parquet":
        return ParquetSink(path, resume)
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return JsonLinesSink(path, resume)
    raise UsageError(f"--out {path}: use a .jsonl file or a .parquet directory")


# --- answering ---------------------------------------------------------------------------------------


def error_record(row_id: str, kind: str, message: str) -> dict[str, Any]:
    return {"id": row_id, "error": {"kind": kind, "message": message}}


async def answer(nlp: Any, task: str, row: Row, images: Path | None, pairs: str) -> dict[str, Any]:
    """One row's record: its id and the API's answer, or its error."""
    from imm import EngineError, ImageError, InvalidInput

    if not isinstance(row.text, str) or not row.text.strip():
        return error_record(row.id, "invalid_text", "the row has no text")
    picture: bytes | None = None
    if row.image:
        path = (images / row.image) if images is not None else Path(row.image)
        try:
            picture = path.read_bytes()
        except OSError as error:
            return error_record(row.id, "image_missing", f"{row.image}: {error.strerror or error}")
    calls = {
        "ner": lambda: nlp.ner(row.text, picture),
        "re": lambda: nlp.re(
            row.text, span(row.head, "head", row.id), span(row.tail, "tail", row.id), picture
        ),
        "extract": lambda: nlp.extract(row.text, picture, pairs=pairs),
    }
    try:
        result = await calls[task]()
    except ImageError as error:
        return error_record(row.id, type(error).__name__, str(error))
    except InvalidInput as error:
        return error_record(row.id, f"invalid_{error.field}", error.message)
    except (EngineError, ValueError) as error:
        return error_record(row.id, type(error).__name__, str(error))
    return {"id": row.id, **result.model_dump()}


def windows(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    window: list[Row] = []
    for row in rows:
        window.append(row)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Answers the rows of ``args.input`` not yet in ``args.out``; returns the summary.

    Rows are taken ``--sort-window`` at a time and sent to the engine fewest word pieces first, so
    that the rows of a batch have about the same length and little of a call is padding (the
    Twitter tweets: 33 pieces a row computed instead of 56, docs/benchmarks.md). A window's records are
    written in input order once all of them are answered, while the next window's rows already
    run; a kill loses only rows not yet written, which ``--resume`` answers again.
    """
    from tqdm import tqdm

    import imm
    from imm.api import shortest_first

    sink = open_sink(args.out, args.resume)
    loading = time.perf_counter()
    errors: collections.Counter[str] = collections.Counter()
    written = skipped = 0
    nlp = await imm.load_async(args.models, **model_options(args))
    started = time.perf_counter()
    try:
        bar = tqdm(unit="rows", desc="extracting", disable=None, file=sys.stderr, smoothing=0.1)
        room = asyncio.Semaphore(args.concurrency)
        unwritten: collections.deque[list[asyncio.Task]] = collections.deque()

        async def bounded(row: Row) -> dict[str, Any]:
            try:
                return await answer(nlp, args.task, row, args.images, args.pairs)
            finally:
                room.release()
                bar.update(1)

        def write_answered_windows() -> None:
            nonlocal written
            while unwritten and all(task.done() for task in unwritten[0]):
                records = [task.result() for task in unwritten.popleft()]
                for record in records:
                    if "error" in record:
                        errors[record["error"]["kind"]] += 1
                sink.write(records)
                written += len(records)

        for window in windows(rows(args), args.sort_window):
            fresh = [row for row in window if row.id not in sink.done]
            skipped += len(window) - len(fresh)
            tasks: list[asyncio.Task] = [None] * len(fresh)  # type: ignore[list-item]
            for index in shortest_first(nlp, [row.text for row in fresh]):
                await room.acquire()
                tasks[index] = asyncio.ensure_future(bounded(fresh[index]))
                write_answered_windows()
            unwritten.append(tasks)
        for tasks in unwritten:
            if tasks:
                await asyncio.wait(tasks)
        write_answered_windows()
        bar.close()
    finally:
        sink.close()
        await nlp.close()
    seconds = time.perf_counter() - started
    return {
        "rows": written + skipped,
        "written": written,
        "skipped_already_done": skipped,
        "errors": dict(errors),
        "load_seconds": round(started - loading, 2),
        "seconds": round(seconds, 2),
        "rows_per_second": round(written / seconds, 1) if seconds else None,
        "out": str(args.out),
    }


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The models the task needs (the other one is not loaded) and the engine's settings."""
    needs = tuple(TASKS) if args.task == "extract" else (args.task,)
    options: dict[str, Any] = {task: "" for task in TASKS if task not in needs}
    # A corpus is not a crowd of clients: the queue may hold every row in flight, and no request
    # times out while the ones before it are answered.
    options |= {"max_queue": max(256, 2 * args.concurrency), "request_timeout_s": 3600.0}
    return options


# --- the command ----------------------------------------------------------------------------------------


def build_parser(prog: str = "imm extract") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("input", type=Path, help="JSON lines, CSV or Parquet file")
    parser.add_argument("--out", type=Path, required=True, help="a .jsonl file or a .parquet directory")
    parser.add_argument(
        "--task",
        choices=(*TASKS, "extract"),
        default="ner",
        help="what each row is answered (as the API's endpoints)",
    )
    parser.add_argument(
        "--models",
        type=Path,
        default=DEFAULT_WEIGHTS,
        help="bundle directory (with ner/ and re/), as imm.load takes (default: the packaged bundles, "
        "weights/ in a checkout)",
    )
    parser.add_argument("--text-column", default="text", help="the column of the rows' texts")
    parser.add_argument("--image-column", help="the column naming each row's picture")
    parser.add_argument("--images", type=Path, help="the directory the picture column's paths are in")
    parser.add_argument(
        "--id-column",
        help="the column of row ids (default: 'id' where the input has it, else the row's number)",
    )
    parser.add_argument(
        "--pairs", choices=("typed", "all"), default="typed", help="--task extract: as the API's"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="rows in flight (default 64)")
    parser.add_argument(
        "--sort-window",
        type=int,
        default=1024,
        help="rows read at a time and sent shortest first, for batches with little padding (default "
        "1024; 1 keeps input order); each window is written in input order",
    )
    parser.add_argument("--resume", action="store_true", help="go on with what --out holds")
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run with Ray Data: on the cluster at ADDRESS ('auto': the one this machine is part of, "
        "or ray://host:10001), or without ADDRESS on RAY_ADDRESS's cluster or a new local one",
    )
    parser.add_argument("--ray-actors", type=int, default=2, help="with --ray: engine actors (default 2)")
    parser.add_argument(
        "--ray-cpus-per-actor", type=float, default=1.0, help="with --ray: CPUs each actor reserves"
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "imm extract") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        input_format(args.input)
        if not args.input.is_file():
            raise UsageError(f"{args.input}: no such file")
        if args.images is not None and not args.images.is_dir():
            raise UsageError(f"--images {args.images}: not a directory")
        if args.concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        if args.sort_window < 1:
            raise UsageError("--sort-window must be at least 1")
        if args.ray is not None:  # "" (no ADDRESS) included
            from imm.extract_ray import run_on_ray

            summary = run_on_ray(args)
        else:
            summary = asyncio.run(run(args))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the command promises one line, never a traceback
        from imm import EngineError

        if isinstance(error, (EngineError, OSError)):
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"interrupted: continue with the same command and --resume ({args.out})", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
