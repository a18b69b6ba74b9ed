"""Calling the HTTP service with retries that help: a 503 (or 429) is retried after its
``Retry-After``, and only while a retry budget shared by the client's calls allows.

Retrying at once multiplies the load of a service that is already past its capacity (the overload
benchmark's users retry at once: at 4x capacity most attempts are retries). Two rules keep retries
useful: wait what the server says (``Retry-After``: the seconds its queue needs to drain, already
spread at random by the server; a little more jitter here), and retry only as a share of the calls
made (a token bucket, as gRPC's and Finagle's retry budgets): when most calls fail, most failures are
returned at once instead of retried. The recipe in docs/service.md uses it with an ``httpx.Client``;
any client whose ``post`` returns an object with ``status_code`` and ``headers`` will do::

    budget = RetryBudget()
    with httpx.Client(base_url="http://127.0.0.1:8000", timeout=2.0) as http:
        answer = post_with_retries(http, "/ner", budget, data={"text": "Alice in Paris"})
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

#: The statuses that say "not now": retried after their Retry-After.
RETRIED_STATUSES = frozenset({429, 503})


class RetryBudget:
    """Retries allowed as a share of calls: each call adds ``ratio`` of a retry (up to ``burst``
    saved), each retry spends one. Share one budget among all the calls of a client (thread-safe)."""

    def __init__(self, ratio: float = 0.1, burst: float = 10.0):
        if ratio < 0 or burst < 1:
            raise ValueError("a retry budget needs ratio >= 0 and burst >= 1")
        self.ratio, self.burst, self.tokens = ratio, burst, burst
        self._lock = threading.Lock()

    def deposit(self) -> None:
        with self._lock:
            self.tokens = min(self.burst, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        """Spends one retry: False (nothing spent) when the budget is exhausted."""
        with self._lock:
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


def retry_after_s(headers: Any) -> float | None:
    """The seconds a ``Retry-After`` header asks for (a number, or an HTTP date); None without one."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def post_with_retries(
    client: Any,
    url: str,
    budget: RetryBudget,
    *,
    attempts: int = 3,
    longest_wait_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    **request: Any,
) -> Any:
    """``client.post(url, **request)``, retried after a 503 or 429 once its ``Retry-After`` has
    passed (plus up to half of it again, at random), at most ``attempts`` tries in all, and only while
    ``budget`` has a retry to spend; the last answer otherwise. An answer without ``Retry-After``, or
    asking for more than ``longest_wait_s``, is returned as it is."""
    budget.deposit()
    for attempt in range(1, attempts + 1):
        answer = client.post(url, **request)
        if answer.status_code not in RETRIED_STATUSES or attempt == attempts:
            return answer
        wait = retry_after_s(answer.headers)
        if wait is None or wait > longest_wait_s or not budget.withdraw():
            return answer
        sleep(wait * (1 + random.random() / 2))
    return answer
