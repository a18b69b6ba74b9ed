"""Corpus rows in and records out, shared by ``imm extract`` on one machine (``imm.extract``) and on
Ray Data (``imm.extract_ray``): reading JSON lines, CSV and Parquet row by row (a bad row is that
row's error, never the run's end), the id, text and picture columns, pictures read only inside
``--images``, the answer of one row, the sinks (JSON lines, Parquet parts) with ``--resume``, the
run record that a resumed run must match, and the lock on ``--out``.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import csv
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imm import DISTRIBUTION
from model.tasks import TASKS

#: The id and picture columns used when ``--id-column`` / ``--image-column`` are not given and the
#: input has them (the picture column with ``--images`` only).
DEFAULT_ID_COLUMN = "id"
DEFAULT_IMAGE_COLUMN = "image"
#: The longest CSV field read (characters): a longer one stops the run. A field longer than the text
#: limit but within this one is that row's error.
CSV_FIELD_LIMIT = 1 << 26
#: Rows per Parquet part file (each written whole, then renamed into place).
PARQUET_ROWS_PER_PART = 1000
#: What a run's output depends on: ``--resume`` refuses an output whose run record differs in any.
RUN_RECORD_KEYS = ("input_sha256", "task", "pairs", "models", "columns")
INPUT_FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet"}


class UsageError(ValueError):
    """A bad argument or input file: one line on stderr, exit status 2."""


@dataclass
class Row:
    id: str | None
    text: Any
    image: Any = None
    head: Any = None
    tail: Any = None
    number: int | None = None  # 1-based, as the input's lines (None: a Ray run's rows)
    problem: BadRow | None = None  # a row that cannot be answered: its record is this error


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


@dataclass
class BadRow:
    """A row that cannot be read (not UTF-8, not a JSON object): its record is this error."""

    kind: str
    message: str
    record: dict[str, Any] | None = None  # what was read of it (a CSV row: its id, when that is fine)


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """The input's rows, streamed, each with its 1-based number (a JSON line's line number; a CSV or
    Parquet row's number, the header not counted). A JSON line that is not UTF-8 or not a JSON
    object, or a CSV row that is not UTF-8, is a ``BadRow``; a file that cannot be parsed as a whole
    (an unbalanced CSV quote, a broken Parquet file) raises ``UsageError`` naming the file and row."""
    fmt = input_format(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if fmt == "json":
        yield from _json_lines(path)
    elif fmt == "csv":
        yield from _csv_rows(path)
    else:
        yield from _parquet_rows(path)


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with open(path, "rb") as handle:  # bytes, decoded line by line: one bad byte spoils one row only
        for number, line in enumerate(handle, 1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line or line.isspace():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield number, BadRow("invalid_row", f"line {number} is not UTF-8 (byte {error.start})")
                continue
            except json.JSONDecodeError as error:
                yield number, BadRow("invalid_row", f"line {number} is not JSON ({error.msg})")
                continue
            if not isinstance(record, dict):
                yield (
                    number,
                    BadRow("invalid_row", f"line {number} is a JSON {type(record).__name__}, not an object"),
                )
                continue
            yield number, record


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    # utf-8-sig: Excel's BOM is not part of the first column's name. surrogateescape: a byte that is
    # not UTF-8 becomes a lone surrogate in its row (found below), instead of stopping the file.
    csv.field_size_limit(CSV_FIELD_LIMIT)  # a long text is the row's error (the text limit), not the file's
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle, strict=True)  # strict: an unbalanced quote is an error, not
        number, line = 0, 1  # the rest of the file swallowed into one field
        try:
            for number, record in enumerate(reader, 1):  # noqa: B007 - read in the except
                line = reader.line_num + 1
                if not all(_is_unicode(value) for value in record.values()):
                    yield number, BadRow("invalid_row", f"row {number} is not UTF-8", record)
                    continue
                yield number, record
        except csv.Error as error:
            raise UsageError(f"{path}: row {number + 1} (from line {line}): {error}") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    number = 0
    try:
        for batch in _parquet_file(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"{path}: row {number + 1}: {error}") from None


def _parquet_file(path: Path):
    try:
        return _pyarrow_parquet().ParquetFile(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: not a Parquet file ({error})") from None


def _is_unicode(value: Any) -> bool:
    """False for a string holding a lone surrogate (an undecodable byte, or a ``"\\ud83d"`` escape)."""
    if not isinstance(value, str) or value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(value: str) -> str:
    """``value`` with lone surrogates as ``\\udXXX`` escapes, for an id or a message to be written."""
    return value if _is_unicode(value) else value.encode("utf-8", "backslashreplace").decode("utf-8")


def input_columns(path: Path) -> list[str]:
    """The file's columns: a CSV's header, a Parquet schema's, the first JSON object's keys."""
    fmt = input_format(path)
    if fmt == "csv":
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            return next(csv.reader(handle), [])
    if fmt == "parquet":
        return list(_parquet_file(path).schema_arrow.names)
    return next((list(record) for _, record in _json_lines(path) if isinstance(record, dict)), [])


def check_input(path: Path) -> str:
    """The input's sha256 (the run record's fingerprint), reading the file once; a CSV is also parsed
    once through, so that a broken one is refused before anything is written."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if input_format(path) == "csv":
        collections.deque(_csv_rows(path), maxlen=0)
    return digest.hexdigest()


def span(value: Any, column: str, row_id: str) -> tuple[int, int]:
    """``[start, end]`` from a JSON list, or ``"start,end"`` / ``"[start, end]"`` text (CSV)."""
    try:
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else value.split(",")
        start, end = (int(part) for part in value)
    except (TypeError, ValueError):
        raise ValueError(f"column {column!r} must hold [start, end], not {value!r}") from None
    return start, end


@dataclass
class Columns:
    """The input columns a run reads (``resolve_columns``)."""

    text: str
    id: str | None
    image: str | None
    notes: list[str]


def resolve_columns(args: argparse.Namespace) -> Columns:
    """The text, id and picture columns, from the arguments and the input's columns: ``id`` and
    ``image`` are used without being named, where the input has them (``image`` with ``--images``:
    without it, a note says the column is ignored). A column the input lacks is refused."""
    have = input_columns(args.input)
    listed = ", ".join(have)[:200]
    id_column = args.id_column or (DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in have else None)
    image_column, notes = args.image_column, []
    if image_column is None and DEFAULT_IMAGE_COLUMN in have:
        if args.images is not None:
            image_column = DEFAULT_IMAGE_COLUMN
        else:
            notes.append(
                f"the {DEFAULT_IMAGE_COLUMN!r} column is ignored: give --images DIR to read its pictures"
            )
    if image_column is not None and args.images is None:
        raise UsageError("--image-column needs --images DIR: pictures are read only inside it")
    json_lines = input_format(args.input) == "json"
    # A JSON line may leave its picture out; a CSV or Parquet file has the column or not.
    for column in filter(None, (args.text_column, id_column, None if json_lines else image_column)):
        if column not in have:
            where = "its first row" if json_lines else "its header"
            raise UsageError(f"{args.input}: no {column!r} column in {where} (has: {listed})")
    return Columns(text=args.text_column, id=id_column, image=image_column, notes=notes)


def _row_id(record: dict[str, Any], column: str | None, number: int) -> tuple[str | None, BadRow | None]:
    """The row's id (its number without an id column), and the problem with it, if any."""
    if column is None:
        return str(number), None
    if record.get(column) is None:
        return None, BadRow("invalid_id", f"row {number} has no {column!r}")
    row_id = str(record[column])
    if not _is_unicode(row_id):
        return _printable(row_id), BadRow("invalid_id", f"row {number}'s id is not Unicode")
    return row_id, None


def rows(args: argparse.Namespace, columns: Columns) -> Iterator[Row]:
    for number, record in read_records(args.input):
        if isinstance(record, BadRow):
            row_id, _ = _row_id(record.record or {}, columns.id, number)
            yield Row(id=row_id, text=None, number=number, problem=record)
            continue
        row_id, problem = _row_id(record, columns.id, number)
        if problem is None and columns.text not in record:
            problem = BadRow("invalid_text", f"row {number} has no {columns.text!r} column")
        yield Row(
            id=row_id,
            text=record.get(columns.text),
            image=record.get(columns.image) if columns.image else None,
            head=record.get("head"),
            tail=record.get("tail"),
            number=number,
            problem=problem,
        )


# --- writing ----------------------------------------------------------------------------------------


def lock_output(out: Path) -> Any:
    """An exclusive lock on ``OUT.lock`` (beside ``--out``), held for the run: a second ``imm
    extract`` on the same ``--out`` is refused at once instead of writing every row again. The file
    stays (removing it would let a third process lock a new file while the second holds the old)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle = open(out.with_name(out.name + ".lock"), "a")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UsageError(
            f"--out {out} is being written by another imm extract (it holds {handle.name})"
        ) from None
    return handle


def run_record_path(out: Path) -> Path:
    return out.with_name(out.name + ".run.json")


def check_run_record(out: Path, run: dict[str, Any]) -> None:
    """On ``--resume``: the input, task and models of the output's run record must be this run's."""
    path = run_record_path(out)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(
            f"--out {out} has no readable run record ({path.name}): it cannot be checked against this "
            "input; remove it, or use another --out"
        ) from None
    for key in RUN_RECORD_KEYS:
        if recorded.get(key) != run[key]:
            raise UsageError(
                f"--out {out} holds another run's rows: its {key} was {recorded.get(key)!r}, now "
                f"{run[key]!r}; use another --out, or remove it"
            )


def save_run_record(out: Path, run: dict[str, Any]) -> None:
    path = run_record_path(out)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


class JsonLinesSink:
    """Rows appended to a JSON lines file, flushed as written (a kill keeps every complete line)."""

    def __init__(self, path: Path, resume: bool, run: dict[str, Any]):
        self.path = path
        self.done: set[str] = set()  # ids (the Ray run's rows have no numbers)
        self.done_rows: set[int] = set()
        holds_rows = path.exists() and path.stat().st_size
        if holds_rows and not resume:
            raise UsageError(f"--out {path} exists: add --resume to go on with it, or remove it")
        if holds_rows:
            check_run_record(path, run)
            self._recover()
        else:
            save_run_record(path, run)
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run

    def _recover(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):  # a kill in mid-write: its partial line goes
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        for number, line in enumerate(complete.splitlines(), 1):
            try:
                record = json.loads(line)
                self.done.add(str(record["id"]))
                if record.get("row") is not None:
                    self.done_rows.add(int(record["row"]))
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"--out {self.path}:{number} is not a record of imm extract") from None

    def write(self, records: list[dict[str, Any]]) -> None:
        self.handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.handle.flush()

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        release(self)


class ParquetSink:
    """Rows in part files of a directory, each written whole (a temporary file, then a rename)."""

    SCHEMA_FIELDS = ("id", "row", "answer", "error", "message")

    def __init__(self, path: Path, resume: bool, run: dict[str, Any]):
        pq = _pyarrow_parquet()
        self.path, self.rows_per_part = path, PARQUET_ROWS_PER_PART
        self.pending: list[dict[str, Any]] = []
        self.done: set[str] = set()
        self.done_rows: set[int] = set()
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {path} exists and is not a directory of Parquet parts")
        parts = sorted(path.glob("part-*.parquet")) if path.is_dir() else []
        if parts and not resume:
            raise UsageError(f"--out {path} holds part files: add --resume to go on with it, or remove it")
        if parts:
            check_run_record(path, run)
        else:
            save_run_record(path, run)
        for stale in path.glob(".part-*.tmp") if path.is_dir() else []:
            stale.unlink()  # a kill in mid-write
        for part in parts:
            table = pq.read_table(part, columns=["id", "row"])
            self.done.update(str(v) for v in table.column("id").to_pylist())
            self.done_rows.update(v for v in table.column("row").to_pylist() if v is not None)
        # Past the highest part, not the count: a part removed by hand must not be overwritten.
        self.next_part = 1 + max((int(part.stem.split("-")[1]) for part in parts), default=-1)
        path.mkdir(parents=True, exist_ok=True)

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            error = record.get("error")
            answer = {k: v for k, v in record.items() if k not in ("id", "row", "error")}
            self.pending.append(
                {
                    "id": record["id"],
                    "row": record.get("row"),
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
        try:
            self._flush()
        finally:
            release(self)


def parquet_schema():
    import pyarrow as pa

    return pa.schema(
        [(name, pa.int64() if name == "row" else pa.string()) for name in ParquetSink.SCHEMA_FIELDS]
    )


def open_sink(path: Path, resume: bool, run: dict[str, Any]) -> JsonLinesSink | ParquetSink:
    if path.suffix.lower() == ".parquet":
        return ParquetSink(path, resume, run)
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return JsonLinesSink(path, resume, run)
    raise UsageError(f"--out {path}: use a .jsonl file or a .parquet directory")


def run_record(args: argparse.Namespace, columns: Columns) -> dict[str, Any]:
    """What the output's rows depend on, saved beside ``--out`` (``OUT.run.json``) and checked by
    ``--resume``: the input's bytes (its sha256: a row inserted, removed or changed is another input),
    the task, the models (name and model hash, from their manifests) and the columns read. A file of
    its own, not a first line of the output: every line of a JSON lines output stays one row, and a
    Parquet directory's parts stay alike."""
    from export.bundle import load_bundle
    from imm.api import _bundles

    options = model_options(args)
    try:
        bundles = _bundles(args.models, options.get("ner"), options.get("re"))
        models = {task: load_bundle(path, verify=False).name for task, path in bundles.items() if path}
    except ValueError as error:  # BundleError
        raise UsageError(f"--models {args.models}: {error}") from None
    return {
        "input_sha256": check_input(args.input),
        "task": args.task,
        "pairs": args.pairs if args.task == "extract" else None,
        "models": models,
        "columns": {"text": columns.text, "id": columns.id, "image": columns.image},
        "input": str(args.input.resolve()),
    }


def open_output(args: argparse.Namespace, columns: Columns) -> JsonLinesSink | ParquetSink:
    """``--out`` locked for this process, checked against this run (``--resume``) or started, and
    opened: every refusal comes before a row is written."""
    lock = lock_output(args.out)
    try:
        sink = open_sink(args.out, args.resume, run_record(args, columns))
    except BaseException:
        lock.close()
        raise
    sink.lock = lock  # type: ignore[union-attr] - released by the sink's close()
    return sink


def release(sink: Any) -> None:
    """Gives up the sink's lock on ``--out`` (``open_output``), once it is closed."""
    lock = getattr(sink, "lock", None)
    if lock is not None:
        lock.close()


# --- answering ---------------------------------------------------------------------------------------


def error_record(row: Row, kind: str, message: str) -> dict[str, Any]:
    return {**_identity(row), "error": {"kind": kind, "message": _printable(message)}}


def _identity(row: Row) -> dict[str, Any]:
    return {"id": row.id} if row.number is None else {"id": row.id, "row": row.number}


class PictureRefused(ValueError):
    """A picture path the row may not read: its record's error."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def picture_path(images: Path, name: Any) -> Path:
    """``name`` (the picture column's value) as a path inside ``images``, without reading it: an
    absolute path, ``..``, or a symbolic link out of ``images`` is refused with the same error whether
    or not the file exists (the answer tells nothing of the machine's other files)."""
    if not isinstance(name, str):
        raise PictureRefused(
            "invalid_image", f"the picture column holds {type(name).__name__}, not a file name"
        )
    outside = PictureRefused("invalid_image", f"{name!r} is not a path inside --images (not read)")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or "\0" in name:
        raise outside
    root = images.resolve()
    try:
        resolved = (root / relative).resolve()  # every symbolic link followed
    except (OSError, RuntimeError):  # a loop of links
        raise outside from None
    if not resolved.is_relative_to(root):
        raise outside
    return resolved


def picture_bytes(images: Path, name: Any, max_bytes: int) -> bytes:
    """The row's picture: a regular file inside ``images``, of at most ``max_bytes``."""
    from imm.api import read_picture_file

    path = picture_path(images, name)
    try:
        return read_picture_file(path, max_bytes)
    except ValueError as error:  # InputTooLarge is an EngineError, raised as is
        raise PictureRefused("invalid_image", f"{name}: {error}".replace(str(path), "the file")) from None
    except OSError as error:
        raise PictureRefused("image_missing", f"{name}: {error.strerror or error}") from None


async def answer(nlp: Any, task: str, row: Row, images: Path | None, pairs: str) -> dict[str, Any]:
    """One row's record: its id, row number and the API's answer, or its error."""
    from imm import EngineError, ImageError, InvalidInput

    if row.problem is not None:
        return error_record(row, row.problem.kind, row.problem.message)
    if not isinstance(row.text, str) or not row.text or row.text.isspace():
        return error_record(row, "invalid_text", "the row has no text")
    picture: bytes | None = None
    try:
        if row.image is not None and row.image != "" and images is not None:
            picture = picture_bytes(images, row.image, nlp.engine.settings.max_upload_bytes)
        calls = {
            "ner": lambda: nlp.ner(row.text, picture),
            "re": lambda: nlp.re(
                row.text, span(row.head, "head", row.id), span(row.tail, "tail", row.id), picture
            ),
            "extract": lambda: nlp.extract(row.text, picture, pairs=pairs),
        }
        result = await calls[task]()
    except PictureRefused as error:
        return error_record(row, error.kind, str(error))
    except ImageError as error:
        return error_record(row, type(error).__name__, str(error))
    except InvalidInput as error:
        return error_record(row, f"invalid_{error.field}", error.message)
    except (EngineError, ValueError) as error:
        return error_record(row, type(error).__name__, str(error))
    return {**_identity(row), **result.model_dump()}


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The models the task needs (the other one is not loaded) and the engine's settings."""
    needs = tuple(TASKS) if args.task == "extract" else (args.task,)
    options: dict[str, Any] = {task: "" for task in TASKS if task not in needs}
    # A corpus is not a crowd of clients: the queue may hold every row in flight, and no request
    # times out while the ones before it are answered.
    options |= {"max_queue": max(256, 2 * args.concurrency), "request_timeout_s": 3600.0}
    return options
