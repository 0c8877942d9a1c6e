"""Flags from settings and settings from flags: the CLI side of ``baton.settings``.

``add_settings(group, defaults)`` adds one flag per setting of ``type(defaults)`` (recursing
into its sections), with its default read off the ``defaults`` instance: a command's
defaults *are* its config's defaults. ``build(defaults, args)`` turns the parsed flags back
into that config. ``add_overrides`` / ``overrides`` do the same for settings a flag may
override with no default of its own (the prefill pool's ``--prefill-num-blocks``).

This is where environment variables are read: a setting that names one (``--nats`` and
``BATON_NATS``) takes it as its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_origin

from baton.settings import Field, SectionField, optional_inner, walk

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default; None as the setting's ``default_help`` (or "none"),
    tuples comma-separated. A required option has none to show (nor one whose help says it is
    required: ``--trace`` of ``baton sim``, which ``baton sim sweep`` does without)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "(required" in text or action.required:
            return text
        if not action.option_strings:
            return text
        if action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: {describe_default(action)})"


def describe_default(action: argparse.Action) -> str:
    shown = getattr(action, "default_help", None)
    value = action.default
    if getattr(action, "secret", False) and value:
        return "set (hidden)"
    if value is None or shown is not None:
        return shown or "none"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, bool) and isinstance(action, argparse.BooleanOptionalAction):
        return "on" if value else "off"
    return str(value).replace("%", "%%")


_KINDS = {int: "integers", float: "numbers", str: "strings"}


def comma_separated(convert: Callable[[str], Any], kind: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type: ``"1,1,2.5"`` -> each item converted, as a tuple."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(convert(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind}, got {text!r}") from None

    return parse


def command(sub: Any, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows every default."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help, formatter_class=HelpFormatter, **kwargs)
    return parser


def add_settings(
    group: Any,
    defaults: DataclassInstance,
    *,
    prefix: str = "",
    exclude: Iterable[str] = (),
) -> None:
    """One flag per setting of ``defaults``' class and of its sections, but those named in
    ``exclude`` (a section's as ``engine.kind``); ``build`` must get the same ``exclude``."""
    for item, value, inner in _members(defaults, exclude):
        if isinstance(item, SectionField):
            add_settings(group, value, prefix=prefix + item.section.prefix, exclude=inner)
        else:
            _add_flag(group, item, prefix, _env_default(item, value))


def build(defaults: C, args: argparse.Namespace, *, prefix: str = "",
          exclude: Iterable[str] = (), **fixed: Any) -> C:
    """``defaults`` with every setting ``add_settings`` made a flag for replaced by the flag's
    value in ``args``, and the fields in ``fixed`` by theirs (built once, validated once)."""
    changes: dict[str, Any] = dict(fixed)
    for item, value, inner in _members(defaults, {*exclude, *fixed}):
        if isinstance(item, SectionField):
            changes[item.name] = build(value, args, prefix=prefix + item.section.prefix,
                                       exclude=inner)
        else:
            changes[item.name] = getattr(args, dest(item, prefix))
    return dataclasses.replace(defaults, **changes)


def _members(
    defaults: DataclassInstance, exclude: Iterable[str]
) -> Iterator[tuple[Field | SectionField, Any, set[str]]]:
    """The sections and CLI settings of ``defaults`` not excluded: each with its default and
    the exclusions inside it (``engine.kind`` is ``kind`` inside ``engine``)."""
    skip = set(exclude)
    for item in walk(type(defaults)):
        if item.name in skip or (isinstance(item, Field) and not item.setting.cli):
            continue
        inner = {s.split(".", 1)[1] for s in skip if s.startswith(item.name + ".")}
        yield item, getattr(defaults, item.name), inner


def add_overrides(group: Any, cls: type, names: Iterable[str], *, prefix: str, note: str) -> None:
    """Flags ``--{prefix}{flag}`` for the settings ``names`` of ``cls``, each defaulting to
    None (keep the base value); ``note`` ends their help."""
    settings = {f.name: f for f in walk(cls) if isinstance(f, Field)}
    for name in names:
        item = settings[name]
        _add_flag(group, dataclasses.replace(
            item, setting=dataclasses.replace(item.setting, help=f"{item.setting.help} ({note})",
                                              default_help="as the others")), prefix, None)


def overrides(cls: type, names: Iterable[str], args: argparse.Namespace, *, prefix: str) -> dict[str, Any]:
    """The override flags of ``add_overrides`` that were given, by field name."""
    settings = {f.name: f for f in walk(cls) if isinstance(f, Field)}
    given = {name: getattr(args, dest(settings[name], prefix)) for name in names}
    return {name: value for name, value in given.items() if value is not None}


def dest(item: Field, prefix: str = "") -> str:
    return (prefix + item.flag).replace("-", "_")


def _env_default(item: Field, value: Any) -> Any:
    """The setting's default, or its environment variable's value (a tuple setting's as
    comma-separated items)."""
    env = item.setting.env
    if not (env and os.environ.get(env)):
        return value
    if get_origin(optional_inner(item.type)) is tuple:
        return tuple(v for v in os.environ[env].split(",") if v)
    return os.environ[env]


def _add_flag(group: Any, item: Field, prefix: str, default: Any) -> None:
    flag = "--" + prefix + item.flag
    kind = optional_inner(item.type)
    meta = item.setting
    kwargs: dict[str, Any] = {"dest": dest(item, prefix), "default": default, "help": meta.help}
    if meta.metavar:
        kwargs["metavar"] = meta.metavar
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(kind) is tuple:
        element = get_args(kind)[0]
        if meta.repeat:
            kwargs.update(action=AppendTuple, type=element)
        else:
            kwargs["type"] = comma_separated(element, _KINDS.get(element, element.__name__))
            kwargs.setdefault("metavar", "X,X,...")
    elif item.choices is not None:
        kwargs.update(choices=item.choices, type=type(item.choices[0]))
    else:
        kwargs["type"] = kind
    action = group.add_argument(flag, **kwargs)
    action.default_help = meta.default_help
    action.secret = meta.secret


class AppendTuple(argparse.Action):
    """A repeatable flag collecting its values in a tuple; the first use replaces the
    default."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest)
        before = () if current is self.default else tuple(current)
        setattr(namespace, self.dest, (*before, values))
