"""Addresses and sockets shared by every TCP listener (request plane, KV transfer, metrics).

A listener binds one address and advertises another: ``--host 0.0.0.0`` listens on every
interface, but peers on other hosts must be told a reachable address, which is
``advertise_host`` when given, else the bind address, else (a wildcard bind) the address
this host's name resolves to. ``tcp_address`` writes ``tcp://HOST:PORT`` (IPv6 in brackets)
and ``parse_tcp_address`` reads it back.

Dead peers: ``keep_alive`` gives a connection TCP keepalive and a user timeout, so a peer that
vanishes without closing (a partition, a powered-off host) fails within seconds rather than at
the kernel's retransmission limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from dataclasses import dataclass

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
KEEPALIVE_IDLE_S = 5
"""An idle connection is probed after this long ..."""
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3
"""... every interval, and dropped after this many unanswered probes (about 11 s)."""
USER_TIMEOUT_MS = 15_000
"""Data the peer has not acknowledged for this long drops the connection (TCP_USER_TIMEOUT)."""


@dataclass(frozen=True)
class Listener:
    """Where a server binds (``host``, ``port``; 0 = any free port) and the host it
    advertises."""

    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None


def is_loopback(host: str) -> bool:
    """``host`` is reachable from this host only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def advertised_host(bind: str, advertise: str | None = None) -> str:
    """The address peers reach a listener bound to ``bind`` at."""
    if advertise:
        return advertise
    if bind not in WILDCARD_HOSTS:
        return bind
    return this_host()


def this_host() -> str:
    """The first address, not a loopback one, that this host's name resolves to."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    for info in infos:
        host = str(info[4][0])
        if not is_loopback(host):
            return host
    raise ValueError(
        f"listening on every interface, but this host's name {name!r} resolves to no "
        "address other hosts can reach: give the address to advertise (--advertise-host)"
    )


def tcp_address(host: str, port: int) -> str:
    """``tcp://HOST:PORT``, an IPv6 host in brackets."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def parse_tcp_address(address: str) -> tuple[str, int]:
    if not address.startswith("tcp://"):
        raise ValueError(f"not a tcp:// address: {address!r}")
    host, _, port = address[len("tcp://") :].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected tcp://HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def keep_alive(transport: asyncio.BaseTransport) -> None:
    """Turns on TCP keepalive and the user timeout for ``transport``'s socket (best effort:
    a platform without an option keeps its default)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    options = (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPALIVE_IDLE_S),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL_S),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), USER_TIMEOUT_MS),
    )
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)
