"""Child processes the toolkit starts: ports, process groups, relayed output."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO

from toolkit.security import redact_uri


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# The environment variable a local child reads its parent's pid from: it exits when that parent is gone.
ENV_PARENT_PID = "TOOLKIT_PARENT_PID"

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: a child between fork and exec must not load libraries.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """``preexec_fn`` of every child: on Linux the kernel sends it SIGTERM when its parent dies (even kill -9).

    Children start in sessions of their own (a Ctrl-C reaches only their parent, which stops them
    in order), so without this they would outlive a parent killed without cleanup. Elsewhere the
    children watch their parent themselves (``ENV_PARENT_PID``; :func:`parent_gone`).
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def parent_gone(parent: int | None = None) -> bool:
    """Whether the parent this process was started by (``ENV_PARENT_PID`` unless given) is gone."""
    if parent is None:
        raw = os.environ.get(ENV_PARENT_PID, "")
        if not raw.isdigit():
            return False
        parent = int(raw)
    return os.getppid() != parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM a child's process group (it started its own session), then SIGKILL after ``grace`` seconds.

    The group is signalled even when its leader already exited: what the leader started (uvicorn
    under ``mlflow server``) may still run in it.
    """
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
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
