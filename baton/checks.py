"""Checks shared by the validated configuration types (``config.py``, ``graph``, trace
synthesis, the sweep): each raises ``ValueError`` naming the offending field. Pure."""

from __future__ import annotations

import re


def require(ok: bool, name: str, message: str) -> None:
    """``ValueError("name: message")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}: {message}")


def require_value(ok: bool, name: str, value: object, rule: str) -> None:
    """``ValueError("name rule, got value")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*")


def valid_model_name(name: str) -> bool:
    """A model name as clients send it and as it may become a folder name: ``org/model-1.5``;
    never ``..``, a leading ``/``, spaces or control characters."""
    return (len(name) <= 256 and _MODEL_NAME.fullmatch(name) is not None
            and ".." not in name.split("/"))


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)
