"""Checks shared by the validated configuration types (``config.py``, ``graph``, trace
synthesis, the sweep): each raises ``ValueError`` naming the offending field. Pure."""

from __future__ import annotations


def require(ok: bool, name: str, message: str) -> None:
    """``ValueError("name: message")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}: {message}")


def require_value(ok: bool, name: str, value: object, rule: str) -> None:
    """``ValueError("name rule, got value")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)
