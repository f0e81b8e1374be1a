"""Run a command that must not outlive this process's parent: ``python -I guard.py CMD...``.

Run as a script (no package import: the toolkit's would load TensorFlow), with the standard
library only.

``mlflow server`` runs uvicorn in a process of its own, and a SIGTERM to ``mlflow`` alone leaves
that one behind. The guard runs the command in its own process group (the guard's), and when its
parent dies (``PR_SET_PDEATHSIG`` on Linux, else a changed parent pid within half a second), it
is told to stop, or the command itself dies, it stops the whole group: SIGTERM, then SIGKILL
after a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE = 5.0


def _stop_group(child: subprocess.Popen) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the guard outlives its own SIGTERM to the group
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(0, signal.SIGKILL)  # the rest of the group (uvicorn), then the guard itself
    return 1


def main(argv: list[str]) -> int:
    parent = os.getppid()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGHUP, lambda *_: stop.append(True))
    child = subprocess.Popen(argv)  # the same process group: one killpg stops it all
    while True:
        code = child.poll()
        if code is not None:
            # The command died (killed, crashed): what it started (uvicorn) must not serve on
            # without it, so the group goes too, and the guard with it.
            return _stop_group(child)
        if stop or os.getppid() != parent:
            return _stop_group(child)
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
