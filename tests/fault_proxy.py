"""A fault-injecting HTTP proxy on loopback, in front of a real OpenAI-compatible server (tests only).

Each request draws a fault from a seeded generator: a 429 with `Retry-After`, a 500, a delay past the
client's timeout, a dropped connection, or none (forwarded upstream). It counts every request it sees, and the
requests it forwarded, so a test can tell what a run paid for.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

FAULTS = ("rate_limited", "server_error", "too_slow", "dropped", "unauthorized")


class FaultProxy:
    def __init__(self, upstream: str, faults: dict[str, float] | None = None, seed: int = 0,
                 slow_s: float = 3.0, retry_after: str = "1"):
        self.upstream = upstream.rstrip("/")
        self.faults = faults or {}
        self.random = random.Random(seed)
        self.slow_s, self.retry_after = slow_s, retry_after
        self.seen = 0
        self.forwarded = 0
        self.upstream_busy = 0  # requests forwarded and not yet answered
        self.injected = dict.fromkeys(FAULTS, 0)
        self.lock = threading.Lock()
        self.client = httpx.Client(timeout=300)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()

    def _draw(self) -> str | None:
        with self.lock:
            self.seen += 1
            roll = self.random.random()
        for fault in FAULTS:
            share = self.faults.get(fault, 0.0)
            if roll < share:
                with self.lock:
                    self.injected[fault] += 1
                return fault
            roll -= share
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                fault = proxy._draw()
                if fault == "rate_limited":
                    self._reply(429, b'{"error": "rate limited"}', {"Retry-After": proxy.retry_after})
                elif fault == "server_error":
                    self._reply(500, b'{"error": "boom"}')
                elif fault == "unauthorized":
                    self._reply(401, b'{"error": "bad key"}')
                elif fault == "too_slow":
                    time.sleep(proxy.slow_s)
                    self._drop()
                elif fault == "dropped":
                    self._drop()
                else:
                    path = self.path.removeprefix("/v1")
                    with proxy.lock:
                        proxy.upstream_busy += 1
                    try:
                        upstream = proxy.client.post(f"{proxy.upstream}{path}", content=body,
                                                     headers={"content-type": "application/json"})
                    finally:
                        with proxy.lock:
                            proxy.upstream_busy -= 1
                            proxy.forwarded += 1
                    try:
                        self._reply(upstream.status_code, upstream.content)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client is gone (a killed run): what it paid for is lost

            def _reply(self, status: int, content: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(content)

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        return Handler
