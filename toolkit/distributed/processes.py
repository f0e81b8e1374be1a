"""Child processes the toolkit starts: ports, process groups, relayed output."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import IO

from toolkit.security import redact_uri


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM a child's process group (it started its own session), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _relay(stream: IO[bytes], prefix: str, mute: threading.Event) -> None:
    """Copy a worker's output to ours, line by line, with its id in front, until ``mute`` is set."""
    with stream:
        for line in iter(stream.readline, b""):
            if not mute.is_set():
                sys.stderr.write(prefix + redact_uri(line.decode(errors="replace")))
                sys.stderr.flush()
