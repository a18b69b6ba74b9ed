"""``imm extract``: the entities and relations of every row of a corpus, without a server.

    imm extract posts.jsonl --out answers.jsonl                      # NER on the "text" column
    imm extract posts.csv --images pics/ --task extract --out answers.parquet   # + the "image" column
    imm extract posts.jsonl --out answers.jsonl --resume             # after a kill: the rows left
    imm extract posts.parquet --out answers.parquet --ray auto       # on a Ray cluster (Ray Data)

Input: JSON lines, CSV (UTF-8, with or without Excel's BOM) or Parquet, by the file's suffix, with a
text column; optionally an id column (``--id-column``; default: ``id`` where there is one, else
the row's number) and a picture column (``--image-column``; default: ``image`` where there is one
and ``--images`` is given; without ``--images`` it is ignored, with a note). The first row's columns
(a CSV's header) are the file's. ``--task re`` also needs ``head`` and ``tail`` columns of
``[start, end]`` character offsets. Pictures are read only inside ``--images``: a relative path
there, a regular file of at most IMM_MAX_UPLOAD_BYTES (an absolute path, ``..``, a link out of it,
a FIFO or a device is that row's error, and is not read).

Output, by ``--out``'s suffix: JSON lines (``.jsonl``), one object per input row, in input order,
``{"id", "row", ...the API's answer...}`` or ``{"id", "row", "error": {"kind", "message"}}``
(``row``: 1-based, a JSON line's line number, a CSV or Parquet row's number); or Parquet
(``.parquet``: a directory of part files) with the columns ``id``, ``row``, ``answer`` (the API's
answer as JSON text), ``error``, ``message``. Beside it: ``OUT.run.json``, the run record (the
input's sha256, the task, the models, the columns), and ``OUT.lock``.

What does not stop a run: a bad row gets its own error and the run goes on (a line that is not
UTF-8 or not a JSON object, a row without the text or id column, a text that is not a string, is
blank, holds a lone surrogate or is longer than IMM_MAX_TEXT_CHARS, an id that is not Unicode, a
picture that is refused, missing, too large or broken). What stops it, in one line on stderr with
exit status 2 and before any row is written: a bad argument, a missing file or column, a CSV that
does not parse (an unbalanced quote, a field past 64 Mi characters: the file and row are named), a
file that is not Parquet, models that cannot load, an ``--out`` that holds rows without
``--resume``, whose run record differs from this run's (another input, task or models), or that
another ``imm extract`` is writing (a lock). Mid-run, only these stop it: a kill or a full disk
(what is written stays whole; ``--resume`` goes on) and a Parquet input broken inside, past its
footer (one line naming the row; the rows before it are kept).

Every row is answered by the same engine as the server's (``imm.load_async``), up to
``--concurrency`` rows in flight, which the engine batches. Rows are read ``--sort-window`` at a
time and sent shortest first (batches of like lengths pad little); each window is written in input
order once it is answered. ``--resume`` reads what ``--out`` already holds and answers only the
rows whose numbers it lacks (duplicate ids are fine): a partial last line (a kill in mid-write) is
cut off, every complete row is kept, none is written twice. A progress bar (rows/s) goes to
stderr; a JSON summary (rows, written, skipped, errors by kind, seconds of loading and of
extraction, rows/s, notes) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.settings import DEFAULT_WEIGHTS
from imm.corpus import (
    Row,
    UsageError,
    answer,
    input_format,
    model_options,
    open_output,
    resolve_columns,
    rows,
)
from model.cli_help import HelpFormatter
from model.tasks import TASKS

__all__ = ["main"]


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

    columns = resolve_columns(args)
    for note in columns.notes:
        print(f"note: {note}", file=sys.stderr)
    sink = open_output(args, columns)
    loading = time.perf_counter()
    errors: collections.Counter[str] = collections.Counter()
    written = skipped = 0
    try:
        nlp = await imm.load_async(args.models, **model_options(args))
    except BaseException:
        sink.close()
        raise
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

        for window in windows(rows(args, columns), args.sort_window):
            fresh = [row for row in window if row.number not in sink.done_rows]
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
        "notes": columns.notes,
    }


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
