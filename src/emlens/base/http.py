"""POSTs to an OpenAI-compatible endpoint that survive a real study: 429, 5xx, timeouts and dropped connections
are retried with exponential backoff and full jitter, never sooner than the server's `Retry-After`; other 4xx are
not retried. A connection lost to a local server that emlens started and that has died fails at once, naming its
exit status and its log's last line. The judge and the loop's user simulator share it, and `check_endpoint`, the
cheap request that tells before any work whether an endpoint can answer at all."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from emlens.base.errors import EmlensInputError
from emlens.base.servers import dead_server_at

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
            dead = dead_server_at(url)  # a dead port never comes back: no retries
            if dead is not None:
                raise error(f"{what}: {dead}") from None
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


OPENAI_HOST = "api.openai.com"
CHECK_TIMEOUT_S = 5.0


def check_endpoint(base_url: str, key: str | None, what: str, key_hint: str, timeout_s: float = CHECK_TIMEOUT_S
                   ) -> None:
    """Fail in one line, before any work, when an OpenAI-compatible endpoint cannot answer: OpenAI's API without a
    key (`key_hint` says where a key goes), a host that cannot be reached in `timeout_s` (GET /models), a key it
    refuses. The line names `what` and the endpoint's host, never the key."""
    import httpx

    host = endpoint_host(base_url)
    if not key and host == OPENAI_HOST:
        raise EmlensInputError(f"{what}: no API key for {host} ({key_hint})")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=timeout_s)
    except (httpx.TimeoutException, httpx.TransportError) as failure:
        reason = dead_server_at(base_url) or f"cannot reach {host} ({transport_reason(failure, timeout_s)})"
        raise EmlensInputError(f"{what}: {reason}") from None
    if response.status_code in (401, 403):
        raise EmlensInputError(f"{what}: {host} refuses the key (HTTP {response.status_code}; {key_hint})")


def endpoint_host(url: str) -> str:
    """host[:port] of a URL, without any user or password in it."""
    parsed = urlparse(url)
    return f"{parsed.hostname}:{parsed.port}" if parsed.port else str(parsed.hostname or url)


def transport_reason(failure: Exception, timeout_s: float) -> str:
    """A failed connection in a few words: DNS, refused, timed out."""
    import httpx

    if isinstance(failure, httpx.TimeoutException):
        return f"no answer in {timeout_s:g} s"
    text = str(failure).splitlines()[0] if str(failure) else ""
    return f"{type(failure).__name__}: {text}" if text else type(failure).__name__


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
