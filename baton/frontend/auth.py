"""Who may call which route of the frontend.

- ``/health``, ``/live`` and ``/metrics`` are open (probes and scrapers).
- With API keys (``--api-key``, ``BATON_API_KEY``, ``--api-key-file``) every other route needs
  ``Authorization: Bearer KEY`` with one of them (401 otherwise).
- Routes that change state (``POST /busy_threshold``) need the admin key when one is set,
  any API key when only those are set, and are refused (403) when the frontend listens beyond
  loopback with no key at all: whoever can reach it could otherwise turn every request into
  a 529.

Keys are compared in constant time. Pure: the key file is read by ``from_config``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from baton.config import FrontendConfig
from baton.errors import AuthenticationError, BatonError, PermissionDeniedError
from baton.runtime.net import is_loopback

OPEN_PATHS = frozenset({"/health", "/live", "/metrics"})
ADMIN_ROUTES = frozenset({("POST", "/busy_threshold")})


@dataclass(frozen=True)
class Access:
    api_keys: tuple[bytes, ...]
    admin_key: bytes | None
    public: bool
    """The frontend listens beyond loopback."""

    @classmethod
    def from_config(cls, config: FrontendConfig) -> Access:
        """The keys of ``config``, those of its key file included (read now: a missing file
        fails the start)."""
        keys = list(config.api_keys)
        if config.api_key_file is not None:
            lines = Path(config.api_key_file).read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        admin = config.admin_key.encode() if config.admin_key else None
        return cls(tuple(k.encode() for k in keys), admin, not is_loopback(config.host))

    def check(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> BatonError | None:
        """Why this call may not go on, or None."""
        if path in OPEN_PATHS:
            return None
        key = _bearer(headers)
        if (method, path) in ADMIN_ROUTES:
            return self._check_admin(key)
        if self.api_keys and not _matches(key, self.api_keys):
            return AuthenticationError(_missing(key))
        return None

    def _check_admin(self, key: bytes | None) -> BatonError | None:
        if self.admin_key is not None:
            return None if _matches(key, (self.admin_key,)) else PermissionDeniedError(
                "this route needs the admin key", code="admin_key_required")
        if self.api_keys:
            return None if _matches(key, self.api_keys) else AuthenticationError(_missing(key))
        if self.public:
            return PermissionDeniedError(
                "administrative routes are off on a frontend that listens beyond loopback "
                "without --admin-key or --api-key", code="admin_disabled")
        return None


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def _matches(key: bytes | None, keys: Iterable[bytes]) -> bool:
    found = False
    for candidate in keys:  # every key is compared: the time says nothing about which
        found |= key is not None and hmac.compare_digest(key, candidate)
    return found


def _missing(key: bytes | None) -> str:
    if key is None:
        return "missing API key: send 'Authorization: Bearer KEY'"
    return "invalid API key"
