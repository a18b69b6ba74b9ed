"""``imm.load`` and ``imm.load_async``: the served models in a Python process, without HTTP.

``AsyncIMM`` holds a ``engine.Engine`` on the caller's event loop; ``IMM`` runs one on an
event loop of its own, in a background thread, and waits for each answer, so plain code calls it
like any function (from several threads too: the engine batches their calls together). Both load
the bundles at once and raise ``ModelUnavailable`` if a bundle they were given cannot serve.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from engine import Engine
from engine.answers import ExtractResponse, NERResponse, REResponse
from engine.errors import ModelUnavailable
from engine.settings import DEFAULT_WEIGHTS, Settings

__all__ = ["IMM", "AsyncIMM", "load", "load_async"]

T = TypeVar("T")
#: A picture: its encoded bytes, a path to it, or an open binary file.
Image = bytes | str | os.PathLike | BinaryIO | None
Span = tuple[int, int]
Task = Literal["ner", "re", "extract"]


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
        task = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("task")
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


def _image_bytes(image: Image) -> bytes | None:
    if image is None or isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    return image.read()


def _settings(path: Any, ner: Any, re: Any, options: dict[str, Any]) -> Settings:
    bundles = _bundles(path, ner, re)
    return Settings(ner_bundle=bundles["ner"] or "", re_bundle=bundles["re"] or "", **options)


class AsyncIMM:
    """The engine's calls as coroutines (see ``imm``); make it with ``await imm.load_async(...)``."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def tasks(self) -> list[str]:
        """The tasks whose models are loaded: "ner", "re"."""
        return [task for task, slot in self.engine.slots.items() if slot.ready]

    def piece_counts(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in word pieces (the models' tokenizer, no truncation): ``pipe`` and
        ``imm extract`` send many texts shortest first, so that the rows of a batch pad little."""
        return self.engine.piece_counts(texts)

    async def ner(self, text: str, image: Image = None) -> NERResponse:
        return await self.engine.ner(text, _image_bytes(image))

    async def re(self, text: str, head: Span, tail: Span, image: Image = None) -> REResponse:
        return await self.engine.re(text, tuple(head), tuple(tail), _image_bytes(image))

    async def extract(
        self,
        text: str,
        image: Image = None,
        *,
        pairs: Literal["typed", "all"] = "typed",
        include_none: bool = False,
    ) -> ExtractResponse:
        return await self.engine.extract(text, _image_bytes(image), pairs=pairs, include_none=include_none)

    async def pipe(
        self, items: Iterable[Any], task: Task = "ner", *, batch_size: int = 32
    ) -> AsyncIterator[NERResponse | REResponse | ExtractResponse]:
        """The answers for ``items``, in order, up to ``batch_size`` in flight (the engine batches them;
        each chunk is sent shortest first, so that a batch's rows pad little). An item is a text, or a
        dict of the call's arguments (``{"text": ..., "image": ...}``; RE: ``head``, ``tail``)."""
        call = {"ner": self.ner, "re": self.re, "extract": self.extract}[task]
        iterator = iter(items)
        while chunk := [_arguments(item) for item in itertools.islice(iterator, batch_size)]:
            answers: list[asyncio.Task] = [None] * len(chunk)  # type: ignore[list-item]
            for index in shortest_first(self, [arguments["text"] for arguments in chunk]):
                answers[index] = asyncio.ensure_future(call(**chunk[index]))
            for answer in await asyncio.gather(*answers):
                yield answer

    async def close(self) -> None:
        await self.engine.close()

    async def __aenter__(self) -> AsyncIMM:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


def shortest_first(nlp: AsyncIMM, texts: Sequence[Any]) -> list[int]:
    """The indices of ``texts``, fewest word pieces first (a text that is not a string, which the call
    will refuse, first of all)."""
    valid = [index for index, text in enumerate(texts) if isinstance(text, str)]
    counts = dict(zip(valid, nlp.piece_counts([texts[index] for index in valid]))) if valid else {}
    return sorted(range(len(texts)), key=lambda index: counts.get(index, -1))


def _arguments(item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        return {"text": item}
    if isinstance(item, dict):
        return item
    raise TypeError(
        f"an item of pipe() is a text or a dict of the call's arguments, not {type(item).__name__}"
    )


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
        try:
            self._async: AsyncIMM = self._wait(load_async(path, ner=ner, re=re, **options))
        except BaseException:
            self._stop()
            raise

    def _submit(self, coroutine: Any) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _wait(self, coroutine: Any) -> Any:
        return self._submit(coroutine).result()

    @property
    def tasks(self) -> list[str]:
        return self._async.tasks

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
        pairs: Literal["typed", "all"] = "typed",
        include_none: bool = False,
    ) -> ExtractResponse:
        """The entities of ``text`` and the relations between them, in one call."""
        return self._wait(self._async.extract(text, image, pairs=pairs, include_none=include_none))

    def pipe(
        self, items: Iterable[Any], task: Task = "ner", *, batch_size: int = 32
    ) -> Iterator[NERResponse | REResponse | ExtractResponse]:
        """The answers for many items, in order (see ``AsyncIMM.pipe``, which runs on the engine's
        loop): ``batch_size`` at a time in flight, batched together by the engine."""
        answers = self._async.pipe(items, task, batch_size=batch_size)
        try:
            while True:
                try:
                    yield self._wait(answers.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._wait(answers.aclose())

    def close(self) -> None:
        if self._loop.is_running():
            self._wait(self._async.close())
        self._stop()

    def _stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def __enter__(self) -> IMM:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def load(
    path: str | os.PathLike | None = DEFAULT_WEIGHTS, *, ner: Any = None, re: Any = None, **options: Any
) -> IMM:
    """The models of ``path``: a directory holding ``ner/`` and ``re/`` bundles (default: the packaged
    bundles, ``DEFAULT_WEIGHTS``: weights/ in a checkout), or one bundle directory; ``ner=``/``re=`` name bundles one by one (``""``: none). ``options`` are the
    server's settings (``engine.settings.Settings``: ``max_batch_size``, ``runtime``, ...; the
    ``IMM_*`` environment and a ``.env`` file fill the rest)."""
    return IMM(path, ner=ner, re=re, **options)
