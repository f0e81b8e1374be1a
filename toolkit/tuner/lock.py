"""One search per card per store at a time: an OS lock beside the card's tuner folder.

The lock is ``fcntl.flock`` on ``<store>/tuner/.<name>.lock``: the kernel drops it when its
holder dies, even by ``kill -9``, so a stale lock never blocks a resume. The file holds who
owns it (host, pid, start time and, for a distributed chief, the oracle's address), so the
second command can say which search runs and how to join it. Across hosts the chief is the
owner: workers never take the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from toolkit.config import ConfigError


class SearchRunning(ConfigError):
    """Another process is running this card's search on this store (exit code 2)."""


class SearchLock:
    """Hold the lock of a card's tuner folder for the length of a search.

    Args:
        workdir: The card's KerasTuner project folder; the lock file lies beside it, so that
            starting a card over (which deletes the folder) keeps the lock.
        card: The card's name or path, for the message a second command prints.
    """

    def __init__(self, workdir: Path, card: str) -> None:
        self.path = workdir.parent / f".{workdir.name}.lock"
        self.card = card
        self._fd: int | None = None
        self._record: dict[str, Any] = {}

    def acquire(self, oracle: str | None = None) -> SearchLock:
        """Take the lock, or raise :class:`SearchRunning` naming the search that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SearchRunning(self._running_message()) from None
        self._fd = fd
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "oracle": oracle}
        self._write()
        return self

    def update(self, **fields: Any) -> None:
        """Add to the owner's record (say, once a chief knows its oracle's address)."""
        if self._fd is not None:
            self._record.update(fields)
            self._write()

    def _write(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(self._record).encode(), 0)

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SearchLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _running_message(self) -> str:
        owner = self._owner()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) if "started" in owner else "?"
        who = f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, since {since}"
        if owner.get("oracle"):
            how = f"join it as a worker: toolkit tune {self.card} --role worker --oracle {owner['oracle']}"
        else:
            how = f"it runs in one process: wait for it, or stop it (kill -INT {owner.get('pid', '<pid>')}) and rerun to resume"
        return f"card {self.card!r}: its search is already running on this store ({who}); {how}"
