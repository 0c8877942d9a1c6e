"""Ends a vLLM engine's processes when the worker that started them dies, kill -9 included.

vLLM runs its engine core (and the core's model workers) in processes of their own, which
nothing stops when their parent is killed outright: they would keep their memory and spin.
``VllmEngine`` starts this module as a small child process, passing its own pid and the pids
of vLLM's processes. The reaper checks every half second whether its parent is still the
worker (a dead parent's children are handed to another process), and then kills those
processes and their children. A worker that closes its engine normally stops its reaper.

``python -m baton.engine.vllm.reaper PARENT_PID PID...``
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

_POLL_S = 0.5


def start(pids: list[int]) -> subprocess.Popen[bytes]:
    """A reaper for ``pids``, a child of this process."""
    return subprocess.Popen(
        [sys.executable, "-m", "baton.engine.vllm.reaper", str(os.getpid()), *map(str, pids)],
        stdin=subprocess.DEVNULL, start_new_session=True)


def descendants() -> set[int]:
    """This process's descendants (vLLM's processes are those that appear as it starts)."""
    import psutil  # a dependency of vLLM

    return {p.pid for p in psutil.Process().children(recursive=True)}


def kill_tree(pids: list[int]) -> None:
    """SIGKILL to ``pids`` and their children, those still alive."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs.extend([proc, *proc.children(recursive=True)])
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)


def main(argv: list[str]) -> None:
    parent, pids = int(argv[0]), [int(a) for a in argv[1:]]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the worker closed its engine
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    kill_tree(pids)


if __name__ == "__main__":
    main(sys.argv[1:])
