"""Hosts for tests: network namespaces on one switch.

``lan(n)`` makes a switch namespace holding a bridge (10.233.K.1) and ``n`` host namespaces,
each joined to the bridge by a veth pair (10.233.K.2, .3, ...); the test's own (root)
namespace joins it too (10.233.K.254), so the test can reach every host. The bridge lives in
a namespace of its own so the machine's firewall never sees the traffic between hosts.

Needs root and iproute2. Where they are missing the tests skip, except with
``BATON_REQUIRE_NETNS=1`` (CI sets it): there they fail, so they cannot be skipped unseen.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Host:
    namespace: str
    ip: str
    link: str = ""
    """Its interface to the switch (``LINKs`` is the switch's end)."""

    @property
    def prefix(self) -> tuple[str, ...]:
        """Runs a command inside this host: ``[*host.prefix, command...]``."""
        return ("ip", "netns", "exec", self.namespace)


@dataclass(frozen=True)
class Lan:
    switch: Host
    """The bridge's namespace, at .1: where shared services (NATS) run."""
    hosts: list[Host]
    local_ip: str
    """The test process's own address on the LAN."""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=20)


def _unavailable(why: str) -> None:
    if os.environ.get("BATON_REQUIRE_NETNS") == "1":
        pytest.fail(f"network namespaces are required here (BATON_REQUIRE_NETNS=1): {why}")
    pytest.skip(why)


@contextlib.contextmanager
def lan(num_hosts: int) -> Iterator[Lan]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        _unavailable("needs root and iproute2 to create network namespaces")
    k = random.randrange(1, 250)
    switch = f"baton-sw{k}"
    try:
        sh("ip", "netns", "add", switch)
    except (subprocess.CalledProcessError, OSError) as exc:
        _unavailable(f"cannot create a network namespace here: {exc}")
    namespaces, links = [switch], []
    try:
        in_switch = ("ip", "netns", "exec", switch)
        sh(*in_switch, "ip", "link", "add", "br0", "type", "bridge")
        sh(*in_switch, "ip", "addr", "add", f"10.233.{k}.1/24", "dev", "br0")
        sh(*in_switch, "ip", "link", "set", "br0", "up")
        sh(*in_switch, "ip", "link", "set", "lo", "up")
        hosts = []
        for i in range(num_hosts):
            name = f"baton-h{k}-{i}"
            sh("ip", "netns", "add", name)
            namespaces.append(name)
            hosts.append(Host(name, f"10.233.{k}.{i + 2}", f"bt{k}h{i}"))
            _plug(switch, k, f"bt{k}h{i}", name, hosts[-1].ip)
        _plug(switch, k, f"bt{k}l", None, f"10.233.{k}.254")
        links.append(f"bt{k}l")
        yield Lan(Host(switch, f"10.233.{k}.1"), hosts, f"10.233.{k}.254")
    finally:
        for link in links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=20)
        for name in reversed(namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def _plug(switch: str, k: int, link: str, namespace: str | None, ip: str) -> None:
    """A veth pair from the bridge to ``namespace`` (None: this one) with ``ip`` at its end."""
    in_switch = ("ip", "netns", "exec", switch)
    sh("ip", "link", "add", link, "type", "veth", "peer", "name", f"{link}s")
    sh("ip", "link", "set", f"{link}s", "netns", switch)
    sh(*in_switch, "ip", "link", "set", f"{link}s", "master", "br0")
    sh(*in_switch, "ip", "link", "set", f"{link}s", "up")
    inside: tuple[str, ...] = ()
    if namespace is not None:
        sh("ip", "link", "set", link, "netns", namespace)
        inside = ("ip", "netns", "exec", namespace)
        sh(*inside, "ip", "link", "set", "lo", "up")
    sh(*inside, "ip", "addr", "add", f"{ip}/24", "dev", link)
    sh(*inside, "ip", "link", "set", link, "up")
