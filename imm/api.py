"""``imm.load`` and ``imm.load_async``: the served models in a Python process, without HTTP.

``AsyncIMM`` holds a ``engine.Engine`` on the caller's event loop; ``IMM`` runs one on an
event loop of its own, in a background thread, and waits for each answer, so plain code calls it
like any function (from several threads too: the engine batches their calls together). Both load
the bundles at once and raise ``ModelUnavailable`` if a bundle they were given cannot serve.

``nlp(text, image)`` answers what the loaded models can: ``extract`` with NER and RE, ``ner`` with
NER alone (an RE model alone needs the head and tail entities: ``nlp.re``); ``pipe`` likewise by
default. A ``pipe`` item that fails is named by its index (``PipeError``), or, with
``errors="return"``, answered by that error while the others go on.

Calls beyond what the engine's queue holds (``max_queue``, from 300 threads or a large ``pipe``
batch) wait their turn instead of being refused. A call after ``close()`` raises ``ShuttingDown``;
an ``IMM`` left open is closed when the process exits (or the object is collected).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import threading
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from engine import Engine
from engine.answers import Answer, ExtractResponse, NERResponse, Pairs, REResponse, Span
from engine.errors import InputTooLarge, InvalidInput, ModelUnavailable, ShuttingDown
from engine.settings import DEFAULT_WEIGHTS, Settings
from export.bundle import BundleError, read_manifest

__all__ = ["IMM", "AsyncIMM", "PipeError", "load", "load_async"]

T = TypeVar("T")
#: A picture: its encoded bytes, a path to it, or an open binary file.
Image = bytes | str | os.PathLike | BinaryIO | None
Task = Literal["ner", "re", "extract"]
#: What ``pipe`` does with an item that fails: raise its ``PipeError``, or yield it in the item's place.
Errors = Literal["raise", "return"]


class PipeError(Exception):
    """The item of ``pipe`` at ``index`` (counted from 0 in the items given) failed with ``error``
    (also its ``__cause__``): ``"item 17: text is empty or only whitespace"``."""

    def __init__(self, index: int, error: Exception):
        super().__init__(f"item {index}: {error}")
        self.index = index
        self.error = error
        self.__cause__ = error


def _bundles(path: str | os.PathLike | None, ner: Any, re: Any) -> dict[str, Path | None]:
    """The NER and RE bundle directories: ``ner``/``re`` as given (``""`` or ``False``: none), else
    from ``path`` (a directory holding ``ner/`` and ``re/``, or one bundle, whose manifest names its
    task)."""
    given = {"ner": ner, "re": re}
    chosen: dict[str, Path | None] = {task: Path(value) if value else None for task, value in given.items()}
    open_tasks = [task for task, value in given.items() if value is None]  # to be taken from ``path``
    if path is None or not open_tasks:
        return chosen
    path = Path(path)
    if (path / "manifest.json").is_file():
        try:
            task = read_manifest(path / "manifest.json").get("task")
        except BundleError as error:
            raise ModelUnavailable(str(error)) from None
        if task not in chosen:
            raise ModelUnavailable(f"{path} is not a NER or RE bundle (its manifest says task {task!r})")
        if task in open_tasks:
            chosen[task] = path
        return chosen
    if not path.is_dir():
        raise ModelUnavailable(f"{path}: no such directory (give a bundle, or a directory with ner/ and re/)")
    found = {task: path / task for task in open_tasks if (path / task / "manifest.json").is_file()}
    if not found and not any(chosen.values()):
        raise ModelUnavailable(f"{path} holds no bundle (neither {path / 'ner'} nor {path / 're'})")
    return chosen | found


def read_picture_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the picture file ``path``: a regular file (a FIFO, a device such as /dev/zero, a
    directory is refused: ``ValueError``, without waiting on it) of at most ``max_bytes``
    (``InputTooLarge``; at most ``max_bytes + 1`` bytes are read)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open does not wait for a writer
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ValueError(f"{os.fspath(path)} is not a regular file")
    with open(descriptor, "rb") as handle:
        return _capped(handle, max_bytes)


def _capped(handle: BinaryIO, max_bytes: int) -> bytes:
    data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputTooLarge(
            f"the picture is larger than the limit of {max_bytes} bytes (IMM_MAX_UPLOAD_BYTES)"
        )
    return data


def _settings(path: Any, ner: Any, re: Any, options: dict[str, Any]) -> Settings:
    bundles = _bundles(path, ner, re)
    return Settings(ner_bundle=bundles["ner"] or "", re_bundle=bundles["re"] or "", **options)


class AsyncIMM:
    """The engine's calls as coroutines (see ``imm``); make it with ``await imm.load_async(...)``."""

    def __init__(self, engine: Engine):
        self.engine = engine
        # Calls in flight, at most what a model's queue admits: more wait here rather than be refused.
        self._room = asyncio.Semaphore(engine.settings.max_queue)
        self._closed = False

    def _image_bytes(self, image: Image) -> bytes | None:
        limit = self.engine.settings.max_upload_bytes
        if image is None or isinstance(image, bytes):
            return image
        if isinstance(image, (str, os.PathLike)):
            return read_picture_file(image, limit)
        return _capped(image, limit)

    async def _call(self, method: Any, text: str, image: Image, *args: Any, **options: Any) -> Any:
        if self._closed:
            raise ShuttingDown("the models are closed (close() was called)")
        async with self._room:
            return await method(text, *args, self._image_bytes(image), **options)

    @property
    def tasks(self) -> list[str]:
        """The tasks whose models are loaded: "ner", "re"."""
        return [task for task, slot in self.engine.slots.items() if slot.ready]

    @property
    def default_task(self) -> Task:
        """What ``pipe`` answers unless told: "extract" with NER and RE loaded, "ner" with NER alone,
        "re" with RE alone."""
        loaded = set(self.tasks)
        if {"ner", "re"} <= loaded:
            return "extract"
        return "ner" if "ner" in loaded else "re"

    async def __call__(self, text: str, image: Image = None) -> NERResponse | ExtractResponse:
        """What the loaded models can answer from ``text`` alone: ``extract`` with NER and RE, ``ner``
        with NER alone."""
        if self.default_task == "extract":
            return await self.extract(text, image)
        if self.default_task == "ner":
            return await self.ner(text, image)
        raise TypeError(_ONLY_RE)

    def piece_counts(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in word pieces (the models' tokenizer, no truncation): ``pipe`` and
        ``imm extract`` send many texts shortest first, so that the rows of a batch pad little."""
        return self.engine.piece_counts(texts)

    async def ner(self, text: str, image: Image = None) -> NERResponse:
        return await self._call(self.engine.ner, text, image)

    async def re(self, text: str, head: Span, tail: Span, image: Image = None) -> REResponse:
        return await self._call(self.engine.re, text, image, tuple(head), tuple(tail))

    async def extract(
        self,
        text: str,
        image: Image = None,
        *,
        pairs: Pairs = "typed",
        include_none: bool = False,
    ) -> ExtractResponse:
        return await self._call(self.engine.extract, text, image, pairs=pairs, include_none=include_none)

    def pipe(
        self,
        items: Iterable[Any],
        task: Task | None = None,
        *,
        batch_size: int = 32,
        errors: Errors = "raise",
    ) -> AsyncIterator[Answer | PipeError]:
        """The answers for ``items``, in order, up to ``batch_size`` in flight (the engine batches them;
        each chunk is sent shortest first, so that a batch's rows pad little). An item is a text, or a
        dict of the call's arguments (``{"text": ..., "image": ...}``; RE: ``head``, ``tail``).
        ``task``: by default ``default_task`` (what the loaded models answer). An item that fails
        raises ``PipeError`` naming its index (after the answers before it), or with
        ``errors="return"`` is answered by its ``PipeError`` and the items after it go on.
        ``ValueError`` at once for a ``batch_size`` below 1, an unknown ``task`` or ``errors``."""
        task = task or self.default_task
        _check_pipe(task, batch_size, errors)
        return self._pipe(items, task, batch_size, errors)

    async def _pipe(
        self, items: Iterable[Any], task: Task, batch_size: int, errors: Errors
    ) -> AsyncIterator[Any]:
        for chunk in _chunks(items, batch_size):
            for answer in _delivered(await self.answer_chunk(chunk, task), errors):
                yield answer

    async def answer_chunk(self, chunk: list[tuple[int, Any]], task: Task) -> list[Answer | PipeError]:
        """The answers to one chunk of ``pipe`` (each item with its index), sent shortest first; an
        item that failed is answered by its ``PipeError``. Errors of the whole API (closed, a model
        not loaded) are raised as they are."""
        call = {"ner": self.ner, "re": self.re, "extract": self.extract}[task]
        arguments = [_arguments(item) for _, item in chunk]
        texts = [given.get("text") if isinstance(given, dict) else None for given in arguments]
        answers: list[asyncio.Task] = [None] * len(chunk)  # type: ignore[list-item]
        for position in shortest_first(self, texts):
            answers[position] = asyncio.ensure_future(_attempt(call, arguments[position]))
        results = await asyncio.gather(*answers, return_exceptions=True)
        for result in results:
            # Not this item's failure: the API's (closed, a model not loaded) or a cancellation.
            if isinstance(result, (ShuttingDown, ModelUnavailable)) or (
                isinstance(result, BaseException) and not isinstance(result, Exception)
            ):
                raise result
        return [
            PipeError(index, result) if isinstance(result, Exception) else result
            for (index, _), result in zip(chunk, results)
        ]

    async def close(self) -> None:
        self._closed = True
        await self.engine.close()

    async def __aenter__(self) -> AsyncIMM:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


def shortest_first(nlp: AsyncIMM, texts: Sequence[Any]) -> list[int]:
    """The indices of ``texts``, fewest word pieces first; a text the call will refuse (not a string,
    past the text limit, not Unicode: the engine's ``check_text``) first of all, never tokenised (a
    50 MB line would take its size many times over)."""
    valid = [index for index, text in enumerate(texts) if _acceptable(nlp.engine, text)]
    counts = dict(zip(valid, nlp.piece_counts([texts[index] for index in valid]))) if valid else {}
    return sorted(range(len(texts)), key=lambda index: counts.get(index, -1))


def _acceptable(engine: Engine, text: Any) -> bool:
    try:
        engine.check_text(text)
    except (InvalidInput, InputTooLarge):
        return False
    return True


_ONLY_RE = (
    "nlp(text) answers with the NER model, and only an RE model is loaded: RE needs the head and "
    "tail entities, call nlp.re(text, head=(start, end), tail=(start, end))"
)


def _check_pipe(task: str, batch_size: int, errors: str) -> None:
    if task not in ("ner", "re", "extract"):
        raise ValueError(f"task must be 'ner', 're' or 'extract', not {task!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, not {batch_size!r}")
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")


def _chunks(items: Iterable[Any], batch_size: int) -> Iterator[list[tuple[int, Any]]]:
    """``items`` with their indices, ``batch_size`` at a time, pulled on the thread that iterates."""
    numbered = enumerate(items)
    while chunk := list(itertools.islice(numbered, batch_size)):
        yield chunk


def _arguments(item: Any) -> dict[str, Any] | TypeError:
    """The call's arguments for an item of ``pipe``, or the error that is its answer."""
    if isinstance(item, str):
        return {"text": item}
    if isinstance(item, dict):
        return item
    return TypeError(
        f"an item of pipe() is a text or a dict of the call's arguments, not {type(item).__name__}"
    )


async def _attempt(call: Any, arguments: dict[str, Any] | Exception) -> Any:
    if isinstance(arguments, Exception):
        raise arguments
    return await call(**arguments)


def _delivered(answers: list[Answer | PipeError], errors: Errors) -> Iterator[Answer | PipeError]:
    """A chunk's answers in order; with ``errors="raise"``, up to its first failed item, whose
    ``PipeError`` is then raised."""
    for answer in answers:
        if isinstance(answer, PipeError) and errors == "raise":
            raise answer
        yield answer


async def load_async(
    path: str | os.PathLike | None = DEFAULT_WEIGHTS, *, ner: Any = None, re: Any = None, **options: Any
) -> AsyncIMM:
    """The models of ``path`` (see ``IMM``), loaded on the running event loop."""
    engine = Engine(_settings(path, ner, re, options))
    await engine.warmup()
    failed = [slot.detail for slot in engine.slots.values() if slot.configured and not slot.ready]
    if failed:
        await engine.close()
        raise ModelUnavailable("; ".join(str(detail) for detail in failed))
    return AsyncIMM(engine)


class IMM:
    """The served models in this process: ``ner``, ``re``, ``extract`` and ``pipe`` return the API's
    answers (see ``imm``). ``close()`` (or ``with``) stops the engine's thread."""

    def __init__(
        self,
        path: str | os.PathLike | None = DEFAULT_WEIGHTS,
        *,
        ner: Any = None,
        re: Any = None,
        **options: Any,
    ):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="imm-engine", daemon=True)
        self._thread.start()
        self._async: AsyncIMM | None = None
        try:
            self._async = self._wait(load_async(path, ner=ner, re=re, **options))
        finally:
            # Closes the engine and stops its thread on close(), when this object is collected, or at
            # the process's exit (else its pending tasks die with the loop: "Task was destroyed").
            self._close = weakref.finalize(self, _shut_down, self._loop, self._thread, self._async)
            if self._async is None:
                self._close()

    def _wait(self, coroutine: Any) -> Any:
        """``coroutine``'s result, run on the engine's loop while this thread waits for it."""
        if self._async is not None and not self._close.alive:
            coroutine.close()
            raise ShuttingDown("the models are closed (close() was called)")
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("an IMM call from the engine's own thread would wait for itself")
        return _run_on(self._loop, coroutine)

    @property
    def tasks(self) -> list[str]:
        """The tasks whose models are loaded: "ner", "re"."""
        return self._async.tasks

    @property
    def default_task(self) -> Task:
        """What ``nlp(text)`` and ``pipe`` answer unless told (see ``AsyncIMM.default_task``)."""
        return self._async.default_task

    def __call__(self, text: str, image: Image = None) -> NERResponse | ExtractResponse:
        """What the loaded models can answer from ``text`` (and its picture) alone: its entities and
        the relations between them with NER and RE loaded (``extract``), its entities with NER alone
        (``ner``); ``TypeError`` with RE alone (it needs the head and tail: ``re``)."""
        return self._wait(self._async(text, image))

    def piece_counts(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in word pieces (see ``AsyncIMM.piece_counts``)."""
        return self._async.piece_counts(texts)

    def ner(self, text: str, image: Image = None) -> NERResponse:
        """The named entities of ``text`` (with its picture, when given)."""
        return self._wait(self._async.ner(text, image))

    def re(self, text: str, head: Span, tail: Span, image: Image = None) -> REResponse:
        """The relation between the entities at character spans ``head`` and ``tail`` of ``text``."""
        return self._wait(self._async.re(text, head, tail, image))

    def extract(
        self,
        text: str,
        image: Image = None,
        *,
        pairs: Pairs = "typed",
        include_none: bool = False,
    ) -> ExtractResponse:
        """The entities of ``text`` and the relations between them, in one call."""
        return self._wait(self._async.extract(text, image, pairs=pairs, include_none=include_none))

    def pipe(
        self,
        items: Iterable[Any],
        task: Task | None = None,
        *,
        batch_size: int = 32,
        errors: Errors = "raise",
    ) -> Iterator[Answer | PipeError]:
        """The answers for many items, in order (see ``AsyncIMM.pipe``): ``batch_size`` at a time in
        flight, batched together by the engine; ``task`` by default what the loaded models answer
        (``default_task``). An item that fails raises ``PipeError`` naming its index, or with
        ``errors="return"`` is answered by it. ``items`` is iterated on the caller's thread, so a
        generator may itself call this object."""
        task = task or self.default_task
        _check_pipe(task, batch_size, errors)
        return self._pipe(items, task, batch_size, errors)

    def _pipe(self, items: Iterable[Any], task: Task, batch_size: int, errors: Errors) -> Iterator[Any]:
        for chunk in _chunks(items, batch_size):
            yield from _delivered(self._wait(self._async.answer_chunk(chunk, task)), errors)

    def close(self) -> None:
        """Closes the engine and stops its thread; later calls raise ``ShuttingDown``."""
        self._close()

    def __enter__(self) -> IMM:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _run_on(loop: asyncio.AbstractEventLoop, coroutine: Any) -> Any:
    """``asyncio.run_coroutine_threadsafe(coroutine, loop).result()`` for a third less CPU in the
    hop there and back (every sync call makes it): the task's end releases a lock this thread
    waits on, instead of completing a ``concurrent.futures.Future`` chained to the task. The same
    outcome: the result, the exception raised, or ``concurrent.futures.CancelledError`` for a
    cancelled task."""
    finished = threading.Lock()
    finished.acquire()
    outcome: list[Any] = []

    def start() -> None:
        try:
            task = loop.create_task(coroutine)
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread, raised there
            outcome.append(error)
            finished.release()
            return
        task.add_done_callback(lambda done: (outcome.append(done), finished.release()))

    loop.call_soon_threadsafe(start)
    finished.acquire()
    done = outcome[0]
    if isinstance(done, BaseException):
        raise done
    if done.cancelled():
        raise CancelledError()
    return done.result()


def _shut_down(loop: asyncio.AbstractEventLoop, thread: threading.Thread, nlp: AsyncIMM | None) -> None:
    if loop.is_running():
        try:
            if nlp is not None:
                asyncio.run_coroutine_threadsafe(nlp.close(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
    if not loop.is_running():
        loop.close()


def load(
    path: str | os.PathLike | None = DEFAULT_WEIGHTS, *, ner: Any = None, re: Any = None, **options: Any
) -> IMM:
    """The models of ``path``: a directory holding ``ner/`` and ``re/`` bundles (default: the packaged
    bundles, ``DEFAULT_WEIGHTS``: weights/ in a checkout), or one bundle directory; ``ner=``/``re=`` name bundles one by one (``""``: none). ``options`` are the
    server's settings (``engine.settings.Settings``: ``max_batch_size``, ``runtime``, ...; the
    ``IMM_*`` environment and a ``.env`` file fill the rest)."""
    return IMM(path, ner=ner, re=re, **options)
