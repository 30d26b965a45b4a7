"""Retries attached once to the session: connection errors, timeouts, 5xx and 429.

Backoff is exponential with full jitter, honours ``Retry-After`` (seconds, an HTTP date, or
the Unix timestamp Docker Hub has sent) and is bounded in attempts and in total time.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import requests
from requests.adapters import HTTPAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    seconds: float = 300.0
    base: float = 0.5
    cap: float = 60.0

    def backoff(self, attempt: int) -> float:
        return random.uniform(self.base / 2, min(self.cap, self.base * 2 ** (attempt - 1)))


def retryable_status(status: int) -> bool:
    return status == 429 or (500 <= status < 600 and status not in (501, 505))


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or None when absent or unreadable."""
    if not value:
        return None
    now = time.time() if now is None else now
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - now)
        except (TypeError, ValueError, IndexError):
            return None
    if number > 1e9:          # a Unix timestamp, not a delay
        return max(0.0, number - now)
    return max(0.0, number)


class RetryAdapter(HTTPAdapter):
    """An HTTPAdapter that re-sends idempotent requests on transient failures."""

    def __init__(self, policy: RetryPolicy, sleep=time.sleep, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy
        self.sleep = sleep

    def send(self, request: requests.PreparedRequest, **kwargs) -> requests.Response:
        deadline = time.monotonic() + self.policy.seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                response = super().send(request, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                delay = self.policy.backoff(attempt)
                if attempt >= self.policy.attempts or time.monotonic() + delay > deadline:
                    raise
                reason = type(exc).__name__
            else:
                remaining = response.headers.get("ratelimit-remaining")
                if remaining is not None:
                    log.info("%s ratelimit-remaining %s", response.url.split("/v2/")[0], remaining)
                if not retryable_status(response.status_code):
                    return response
                delay = retry_after(response.headers.get("Retry-After"))
                if delay is None:
                    delay = self.policy.backoff(attempt)
                if attempt >= self.policy.attempts or time.monotonic() + delay > deadline:
                    return response
                reason = f"HTTP {response.status_code}"
                response.close()
            log.warning("%s %s: %s, retrying in %.1fs (attempt %d of %d)", request.method,
                        request.url, reason, delay, attempt + 1, self.policy.attempts)
            self.sleep(delay)
