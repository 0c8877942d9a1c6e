"""How a setting is declared: once, as a field of a frozen config dataclass.

``setting(default, help, ...)`` is a dataclass field that also carries what the command line,
the graph schema and the docs need: its help text, its flag name, an environment variable
the CLI may read as its default. ``section(factory)`` nests one config inside another (the
scheduler inside the engine). Everything else is derived from the dataclass: the type of a
setting from its annotation (a ``Literal`` gives the choices), its default from the
instance the CLI starts from. ``baton.cli.args`` turns settings into flags and back; the
graph schema turns the engine's settings into the keys of its ``engine`` section.

Pure: no I/O, and no environment variable is read here (the CLI does that).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Setting:
    """What a config field says about itself beyond its name, type and default."""

    help: str
    flag: str | None = None
    """The CLI flag without its dashes; None: the field's name with '-' for '_'."""
    env: str | None = None
    """An environment variable the CLI reads as the default (``BATON_NATS``)."""
    metavar: str | None = None
    default_help: str | None = None
    """What the default means, shown in ``--help`` instead of the value (for None)."""
    repeat: bool = False
    """A tuple given by repeating the flag; otherwise a tuple is comma-separated."""
    cli: bool = True
    """False: not on the command line (set by code, e.g. a test switch)."""
    secret: bool = False
    """A key or password: kept out of the config's repr and of ``--help``."""


@dataclass(frozen=True, slots=True)
class Section:
    """A nested config; its settings' flags get ``prefix``."""

    prefix: str = ""


_SETTING = "baton.setting"
_SECTION = "baton.section"


def setting(
    default: T,
    help: str,
    *,
    flag: str | None = None,
    env: str | None = None,
    metavar: str | None = None,
    default_help: str | None = None,
    repeat: bool = False,
    cli: bool = True,
    secret: bool = False,
) -> T:
    """A config field with its default and help (``default`` must be immutable)."""
    meta = Setting(help, flag, env, metavar, default_help, repeat, cli, secret)
    return dataclasses.field(default=default, repr=not secret, metadata={_SETTING: meta})


def section(factory: Callable[[], T], *, prefix: str = "") -> T:
    """A nested config built by ``factory`` by default."""
    return dataclasses.field(default_factory=factory, metadata={_SECTION: Section(prefix)})


@dataclass(frozen=True, slots=True)
class Field:
    """One setting of a config class, resolved: its name, type and declaration."""

    name: str
    type: Any
    setting: Setting

    @property
    def flag(self) -> str:
        return self.setting.flag or self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The values of a ``Literal`` type (optional or not), else None."""
        inner = optional_inner(self.type)
        return get_args(inner) if get_origin(inner) is Literal else None


@dataclass(frozen=True, slots=True)
class SectionField:
    name: str
    type: type
    section: Section


def walk(cls: type) -> Iterator[Field | SectionField]:
    """The settings and sections of a config class, in declaration order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if _SETTING in f.metadata:
            yield Field(f.name, hints[f.name], f.metadata[_SETTING])
        elif _SECTION in f.metadata:
            yield SectionField(f.name, hints[f.name], f.metadata[_SECTION])


def settings_of(cls: type) -> dict[str, Field]:
    """The settings declared directly on ``cls``, by field name."""
    return {f.name: f for f in walk(cls) if isinstance(f, Field)}


def check_choices(config: object) -> None:
    """Raises ``ValueError`` naming (as its flag spells it) the first ``Literal`` setting whose
    value is not one of its choices (the choices are spelled once: in the type)."""
    for f in settings_of(type(config)).values():
        value = getattr(config, f.name)
        choices = f.choices
        if choices is not None and value is not None and value not in choices:
            listed = ", ".join(str(c) for c in choices)
            raise ValueError(f"{f.flag.replace('-', '_')}: one of {listed}, got {value!r}")


def optional_inner(tp: Any) -> Any:
    """``X`` for ``X | None``; ``tp`` itself otherwise."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
