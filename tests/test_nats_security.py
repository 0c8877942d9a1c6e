"""NATS with TLS and authentication: a real nats-server that verifies its clients (an NKey
user and a password user) over TLS; a process with the right options finds the others, one
without them fails to start with a clear error."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nkeys
import pytest

from baton.config import RuntimeConfig
from baton.runtime.discovery import InstanceRecord
from baton.runtime.process import describe_discovery, open_runtime
from tests.nats_fixture import NATS_SERVER_BIN, free_port


@pytest.fixture(scope="module")
def secure_nats(tmp_path_factory: pytest.TempPathFactory):
    """A TLS nats-server (JetStream on) for an NKey user and user ``baton``/``pw``."""
    if NATS_SERVER_BIN is None or shutil.which("openssl") is None:
        pytest.skip("needs nats-server and the openssl command")
    root = tmp_path_factory.mktemp("nats-tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = root / "user.nk"
    seed_file.write_bytes(seed)
    port = free_port()
    conf = root / "nats.conf"
    conf.write_text(f"""
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{root / 'js'}" }}
tls {{ cert_file: "{cert}", key_file: "{key}" }}
authorization {{ users = [ {{ nkey: {public} }}, {{ user: baton, password: pw }} ] }}
""")
    proc = subprocess.Popen([NATS_SERVER_BIN, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield port, cert, seed_file
    finally:
        proc.kill()
        proc.wait(10)


def wait_listening(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nats-server did not start")


async def registers_and_sees(a: RuntimeConfig, b: RuntimeConfig) -> None:
    record = InstanceRecord(instance_id=5, namespace="baton", component="worker",
                            endpoint="generate", address="tcp://127.0.0.1:1")
    async with open_runtime(a, name="a") as one, open_runtime(b, name="b") as two:
        await one.discovery.register(record)
        for _ in range(100):
            if any(r.instance_id == 5 for r in two.discovery.snapshot()):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the record did not reach the other process")


async def test_processes_meet_over_tls_with_an_nkey_and_a_password(secure_nats) -> None:
    port, cert, seed = secure_nats
    nkey_user = RuntimeConfig(nats=f"tls://127.0.0.1:{port}", nats_tls_ca=str(cert),
                              nats_nkey=str(seed))
    password_user = RuntimeConfig(nats=f"tls://baton:pw@127.0.0.1:{port}",
                                  nats_tls_ca=str(cert))
    await registers_and_sees(nkey_user, password_user)
    assert "pw" not in describe_discovery(password_user)


@pytest.mark.parametrize("options", [
    ["--nats-tls-ca", "{cert}"],  # no credentials
    ["--nats-nkey", "{seed}"],  # the server's certificate is not trusted
    ["--nats-tls-ca", "{cert}", "--nats-nkey", "/nonexistent/seed.nk"],
], ids=["no-credentials", "untrusted-server", "missing-seed-file"])
def test_a_worker_without_the_right_options_fails_clearly(secure_nats, options) -> None:
    port, cert, seed = secure_nats
    args = [a.format(cert=cert, seed=seed) for a in options]
    out = subprocess.run(
        [sys.executable, "-m", "baton", "worker", "--nats", f"tls://127.0.0.1:{port}", *args],
        capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip(), "no error message"


def test_redacted(tmp_path: Path) -> None:
    from baton.runtime.process import redact_url

    assert redact_url("nats://u:p@host:4222") == "nats://host:4222"
    assert redact_url("tls://token@host:4222") == "tls://host:4222"
    assert redact_url("nats://host:4222") == "nats://host:4222"
