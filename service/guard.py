"""The API key, the upload size limit, the client's deadline, admission and the body deadline,
checked on the raw ASGI stream before any parsing; and the answer of a request the server gives up
on at shutdown.

The checks run before FastAPI reads the multipart body, so an unauthenticated or oversized upload
costs the server nothing: a ``Content-Length`` over the limit is refused before one byte of the
body is read, and a body without one (chunked) is counted while it streams and cut off as soon as
it passes the limit, without reading the rest. A body trickled in slowly is cut off with 408 once
``body_timeout_s`` has passed since the request's head arrived (the head's own deadline is the
server's: ``service.server``).

**Deadlines and early refusal.** ``X-Request-Timeout: SECONDS`` says how long the client will wait
(from the arrival of the request's head; capped by the engine at ``IMM_REQUEST_TIMEOUT_S``): the
deadline goes to the route in the request's ``RequestContext`` (``service.context``) (a malformed value is a 400). Then
``admit(path, deadline)`` asks the engine whether the models of the path could take the request;
when they could not (``Overloaded``: a full queue, or one that would not answer by the deadline) the
request gets its 503 and ``Retry-After`` at once, before one byte of its body is read or parsed.
A small declared body (up to ``DRAIN_LIMIT``, which has usually arrived with the head) is then read
and thrown away so that the connection stays open for the client's next request; a larger one, or
one the client holds back behind ``Expect: 100-continue`` (the ``100 Continue`` is never sent), is
left unread and the connection closed.

At shutdown the server (uvicorn) lets requests in flight finish for its grace period, then cancels
the ones still running: those (still queued for the model, being preprocessed, or in the batch that
is running) are answered here with the documented JSON 503 and ``Retry-After``, instead of the
server's plain-text 500.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import Overloaded
from service.context import request_context
from service.errors import send_json_error

#: The header in which a client says how many seconds it will wait for its answer.
TIMEOUT_HEADER = b"x-request-timeout"
#: A refused request's declared body up to this size is read (and discarded) to keep the connection.
DRAIN_LIMIT = 64 * 1024


class Releasable(Protocol):
    """What ``admit`` returns: the request's places in the queues, given back once it ends."""

    def release(self) -> None: ...


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the streamed body passes the limit."""


class BodyTooSlow(Exception):
    """Raised from ``receive`` once the body's deadline has passed."""


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def authorised(scope: Scope, api_key: bytes | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <api_key>`` (always, when no key is set)."""
    if api_key is None:
        return True
    value = _header(scope, b"authorization") or b""
    scheme, _, token = value.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key)


class GuardMiddleware:
    """401 without the right bearer token, 413 for a body over ``max_body_bytes``, on ``paths`` only."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        paths: Iterable[str],
        max_body_bytes: int,
        api_key: str | None,
        body_timeout_s: float = 30.0,
        retry_after_s: int = 1,
        admit: Callable[[str, float | None], Releasable] | None = None,
        check: Callable[[str, float | None], None] | None = None,
    ):
        self.app = app
        self.paths = frozenset(paths)
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.body_timeout_s = body_timeout_s
        self.retry_after = str(retry_after_s).encode()
        self.admit = admit
        self.check = check

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        status: int,
        detail: str,
        headers: list | None = None,
        keep_alive: bool = False,
    ) -> None:
        request_id = request_context(scope).request_id
        closing = [] if keep_alive else [(b"connection", b"close")]
        await send_json_error(send, status, detail, request_id, [*closing, *(headers or [])])

    def _authorised(self, scope: Scope) -> bool:
        return authorised(scope, self.api_key)

    async def _refuse_unread(self, scope: Scope, receive: Receive, send: Send, error: Overloaded) -> None:
        """The 503 of a request refused before its body: the connection kept when a small body could
        be drained (see the module's docstring)."""
        keep_alive = await drain_small_body(scope, receive)
        headers = [(b"retry-after", str(max(1, math.ceil(error.retry_after_s))).encode())]
        await self._refuse(scope, send, 503, f"{error}: retry later", headers, keep_alive)

    def _check_head(self, scope: Scope, arrived: float) -> tuple[tuple[int, str, list] | None, float | None]:
        """The refusal of a request's head that comes before admission (401, 400, 413: status, detail,
        headers), if any, and the request's deadline (from ``X-Request-Timeout``)."""
        if not self._authorised(scope):
            return (
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                [(b"www-authenticate", b"Bearer")],
            ), None
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                declared_size = int(declared)
            except ValueError:
                return (400, "invalid Content-Length", []), None
            if declared_size > self.max_body_bytes:
                return (413, f"request body larger than the limit of {self.max_body_bytes} bytes", []), None
        timeout = _header(scope, TIMEOUT_HEADER)
        if timeout is None:
            return None, None
        seconds = _seconds(timeout)
        if seconds is None:
            return (400, "X-Request-Timeout must be a positive number of seconds, such as 1.5", []), None
        return None, arrived + seconds

    def refuse_early(self, path: str, headers: list[tuple[bytes, bytes]]) -> Overloaded | None:
        """For the connection layer (``service.server``), on a request's head alone: ``Overloaded``
        when its admission would refuse it (``check``, which takes no place in the queues) and this
        guard has no other answer first (401, 400, 413); None when the request is to go through the
        app as usual."""
        if self.check is None or path not in self.paths:
            return None
        refusal, deadline = self._check_head({"headers": headers}, time.monotonic())
        if refusal is not None:
            return None
        try:
            self.check(path, deadline)
        except Overloaded as error:
            return error
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        refusal, deadline = self._check_head(scope, time.monotonic())
        if refusal is not None:
            await self._refuse(scope, send, *refusal)
            return
        context = request_context(scope)
        context.deadline = deadline
        admission = None
        if self.admit is not None:
            try:
                admission = self.admit(scope["path"], deadline)
            except Overloaded as error:
                await self._refuse_unread(scope, receive, send, error)
                return
        context.admission = admission
        try:
            await self._guarded(scope, receive, send)
        finally:
            if admission is not None:
                admission.release()  # what the route's call did not take (it ended early, or failed)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request, its body counted and timed against the limits."""
        too_large = f"request body larger than the limit of {self.max_body_bytes} bytes"
        received = 0
        refusal: tuple[int, str] | None = None  # set once the body broke a limit
        response_started = False
        too_slow = f"request body not received within {self.body_timeout_s:g} s"
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        body_done = False

        async def counting_receive() -> Message:
            nonlocal received, refusal, body_done
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                message = await _receive_by(receive, deadline)
            except (asyncio.TimeoutError, TimeoutError):
                refusal = (408, too_slow)
                raise BodyTooSlow(too_slow) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refusal = (413, too_large)
                    raise BodyTooLarge(too_large)
                body_done = not message.get("more_body", False)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal response_started
            if refusal is not None:
                # The framework turned our exception into its own error answer: replace it.
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await self._refuse(scope, send, *refusal)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except (BodyTooLarge, BodyTooSlow):
            if not response_started and refusal is not None:
                await self._refuse(scope, send, *refusal)
        except asyncio.CancelledError:
            # Only the server cancels a request (uvicorn, when its shutdown grace period is over; a
            # client that goes away does not cancel it): answer it, then let the task end.
            if response_started:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            await self._refuse(
                scope,
                send,
                503,
                "the service is shutting down: retry (on another instance)",
                [(b"retry-after", self.retry_after)],
            )


def _seconds(value: bytes) -> float | None:
    """A header's positive, finite number of seconds, or None."""
    try:
        seconds = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return seconds if 0 < seconds < math.inf else None


async def _receive_by(receive: Receive, deadline: float) -> Message:
    """``receive()``, or ``TimeoutError`` at ``deadline`` (the loop's time). ``asyncio.timeout_at``
    where there is one (Python 3.11): ``wait_for`` makes a task per call, on every request."""
    if _timeout_at is not None:
        async with _timeout_at(deadline):
            return await receive()
    return await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())


_timeout_at = getattr(asyncio, "timeout_at", None)


def drainable(scope: Scope) -> bool:
    """Whether a request's body is worth reading to keep its connection after an answer that does
    not need it: not for a body larger than ``DRAIN_LIMIT`` or without ``Content-Length``, nor one
    behind ``Expect: 100-continue`` (its client waits for a ``100 Continue`` that never comes)."""
    declared = _header(scope, b"content-length")
    if declared is None or not declared.isdigit() or int(declared) > DRAIN_LIMIT:
        return False
    return (_header(scope, b"expect") or b"").lower() != b"100-continue"


async def drain_small_body(scope: Scope, receive: Receive) -> bool:
    """Reads a request's body to its end and throws it away, so that the connection can stay open
    after an answer that does not need it: True once read; False (left unread) when it is not
    ``drainable``, or not in within a second."""
    return drainable(scope) and await _drain(receive)


async def _drain(receive: Receive, timeout_s: float = 1.0) -> bool:
    """Reads a small body to its end (True), or gives up after ``timeout_s`` or a disconnect (False)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            message = await _receive_by(receive, deadline)
        except (asyncio.TimeoutError, TimeoutError):
            return False
        if message["type"] != "http.request":
            return False
        if not message.get("more_body", False):
            return True
