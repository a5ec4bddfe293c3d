"""Local servers that emlens started (llama.cpp's or vLLM's OpenAI-compatible server on loopback), by port.

A client that loses its connection to one asks here whether it died: then it fails at once with one line (the
exit status, a signal by name, and the last line of the server's log) instead of retrying a dead port.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DEATH_GRACE_S = 0.5  # a dropped connection can come a moment before the dying process can be reaped
LOG_TAIL_BYTES = 8192
_servers: dict[int, tuple[subprocess.Popen, Path]] = {}
_lock = threading.Lock()


def register_local_server(port: int, proc: subprocess.Popen, log_path: str | Path) -> None:
    with _lock:
        _servers[port] = (proc, Path(log_path))


def unregister_local_server(port: int) -> None:
    with _lock:
        _servers.pop(port, None)


def local_server_process(port: int) -> subprocess.Popen | None:
    with _lock:
        found = _servers.get(port)
    return found[0] if found else None


def dead_local_server(port: int, grace_s: float = DEATH_GRACE_S) -> str | None:
    """One line when the server emlens started on `port` has exited (None: not ours, or still running)."""
    with _lock:
        found = _servers.get(port)
    if found is None:
        return None
    proc, log_path = found
    try:
        code = proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        return None
    return f"the local server on port {port} died ({exit_status(code)}); last log line: {last_log_line(log_path)!r}"


def dead_server_at(url: str, grace_s: float = DEATH_GRACE_S) -> str | None:
    """`dead_local_server` for the port of a loopback URL; None for any other URL."""
    parsed = urlparse(url)
    if parsed.hostname not in LOOPBACK or parsed.port is None:
        return None
    return dead_local_server(parsed.port, grace_s)


def exit_status(code: int) -> str:
    """`exit status 1`, or `killed by SIGSEGV` for a negative status (Popen's way of naming a signal)."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def last_log_line(path: Path, width: int = 200) -> str:
    """The last non-empty line of a log file, at most `width` characters ('' when there is none)."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:width] if lines else ""
