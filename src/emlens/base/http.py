"""POSTs to an OpenAI-compatible endpoint that survive a real study: 429, 5xx, timeouts and dropped connections
are retried with exponential backoff and full jitter, never sooner than the server's `Retry-After`; other 4xx are
not retried. The judge and the loop's user simulator share it."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from emlens.base.errors import EmlensInputError

RETRIED_STATUS = {429, 500, 502, 503, 504}


@dataclass
class RetryPolicy:
    max_attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter over an exponential cap; never sooner than the server's Retry-After."""
        jittered = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** attempt))
        return max(jittered, retry_after or 0.0)


def post_with_retries(client, url: str, body: dict, policy: RetryPolicy, error: type[EmlensInputError],
                      what: str, resume_hint: str = "", on_attempt: Callable[[], None] | None = None) -> dict:
    """The JSON answer to one POST (an httpx client), retried under `policy`; else `error` naming `what` (the
    endpoint, never the key: a body may echo the request), the last status and, after the last attempt,
    `resume_hint`."""
    import httpx

    status = "no response"
    for attempt in range(policy.max_attempts):
        if on_attempt is not None:
            on_attempt()
        retry_after = None
        try:
            response = client.post(url, json=body)
        except (httpx.TimeoutException, httpx.TransportError) as failure:
            status = type(failure).__name__  # a timeout or a dropped connection
        else:
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    status = "HTTP 200 with a body that is not JSON"
            else:
                status = f"HTTP {response.status_code}"
                if response.status_code not in RETRIED_STATUS:
                    raise error(f"{what}: {status} (not retried)")
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
        if attempt + 1 < policy.max_attempts:
            time.sleep(policy.delay(attempt, retry_after))
    raise error(f"{what}: {status} after {policy.max_attempts} attempts{resume_hint}")


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (a number or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
