"""``--deployment FILE``: a command's settings from a YAML file.

A deployment file is a mapping whose keys are the command's flags with underscores
(``--max-num-seqs`` is ``max_num_seqs``; a switch is a bool: ``prefix_caching: false`` is
``--no-prefix-caching``; a list is a comma-separated value). A mapping under a key that is
not a flag only groups keys for the reader (``parallelism: {tp: 1, attention_dp: 8}``). A
relative path in ``roofline_model`` or ``timing_profile`` is relative to the file.

The file's values go through the command's own parser, so they are checked and converted as
the flags are; a flag given on the command line wins over the file (before ``--deployment``,
only with a value other than its default, which argparse cannot tell from not given). Keys another command
uses for the same deployment can be named ``ignored`` (``baton sim sweep`` chooses the pools
itself and reads the rest of a ``baton sim`` deployment file).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from baton.cli.args import AppendTuple

log = logging.getLogger(__name__)

PATH_KEYS = frozenset({"roofline_model", "timing_profile"})
"""Keys whose relative paths are relative to the deployment file."""
_SKIP = frozenset({"help", "deployment", "trace"})


class DeploymentFile(argparse.Action):
    """The ``--deployment FILE`` flag: the file's settings replace the defaults of the
    flags not given on the command line."""

    def __init__(self, option_strings: list[str], dest: str,
                 ignored: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.ignored = frozenset(ignored)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        try:
            argv = deployment_argv(Path(values), parser, self.ignored)
        except (OSError, ValueError) as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        from_file = parser.parse_args(argv)
        for action in parser._actions:  # noqa: SLF001 - argparse keeps them nowhere public
            dest = action.dest
            if dest in _SKIP or not hasattr(from_file, dest):
                continue
            if getattr(namespace, dest, action.default) == action.default:  # not given
                setattr(namespace, dest, getattr(from_file, dest))
        setattr(namespace, self.dest, values)


def deployment_argv(path: Path, parser: argparse.ArgumentParser,
                    ignored: Iterable[str] = ()) -> list[str]:
    """The command line ``path`` stands for: its keys that are flags of ``parser``. Keys in
    ``ignored`` that are not are skipped; any other key, or a file that is no mapping, is a
    ValueError."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: a deployment file is a mapping of settings")  # noqa: TRY004
    actions = {a.dest: a for a in parser._actions if a.option_strings}  # noqa: SLF001
    skip = frozenset(ignored)
    argv: list[str] = []
    skipped: list[str] = []
    for key, value in _settings(raw, actions):
        if value is None or (key not in actions and key in skip):
            skipped += [key] if value is not None else []
            continue
        if key not in actions or key in _SKIP:
            raise ValueError(f"{path}: {key!r} is not a setting of this command")
        if key in PATH_KEYS and not Path(str(value)).is_absolute():
            value = str(path.parent / str(value))
        argv.extend(_flag(actions[key], key, value))
    if skipped:
        log.warning("%s: %s not used here (%s)", path, ", ".join(skipped), parser.prog)
    return argv


def _settings(raw: Mapping[Any, Any],
              actions: Mapping[str, argparse.Action]) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` pairs, the groups flattened."""
    for key, value in raw.items():
        name = str(key)
        if isinstance(value, Mapping) and name not in actions:
            yield from _settings(value, actions)
        else:
            yield name, value


def _flag(action: argparse.Action, key: str, value: Any) -> list[str]:
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"{key}: must be true or false, got {value!r}")
        return [action.option_strings[0] if value else action.option_strings[1]]
    flag = action.option_strings[0]
    if isinstance(value, list | tuple):
        if not isinstance(action, AppendTuple):
            return [flag, ",".join(str(v) for v in value)]
        return [part for v in value for part in (flag, str(v))]
    if isinstance(value, Mapping):
        raise ValueError(f"{key}: must be a value, not a mapping")
    return [flag, str(value)]
