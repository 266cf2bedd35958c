"""What every command shares: ``--config`` + flags derived from one settings dataclass,
``--print-config``, and the resolved settings saved beside the output."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from slimtune.config.fields import (
    add_flags,
    load_yaml,
    save_settings,
    settings_dict,
    settings_from_args,
)


def add_settings_arguments(p: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """``--config``, one flag per field of ``cls``, and ``--print-config``."""
    add_flags(p, cls, exclude=exclude)
    add_print_config(p)


def add_print_config(p: argparse.ArgumentParser) -> None:
    """``--print-config``: print the resolved settings as YAML and stop before loading weights."""
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (defaults < --config < flags) as YAML and exit")


def resolve_settings(cls: type, args: argparse.Namespace, command: str, section: str | None = None) -> Any:
    """The validated settings of a command (``--config`` file, then flags).

    With ``--print-config`` nothing is written, so the guard against replacing a finished output
    folder does not apply: the settings are validated as if ``--overwrite`` were given, and
    printed with the value the user gave.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    if not (getattr(args, "print_config", False) and "overwrite" in names):
        return settings_from_args(cls, args, section=section or command, command=command)
    given = args.overwrite
    args.overwrite = True
    try:
        obj = settings_from_args(cls, args, section=section or command, command=command)
    finally:
        args.overwrite = given
    if given is None and getattr(args, "config", None):  # the value the --config file gives, if any
        tree = load_yaml(args.config)
        tree = tree.get(section or command, tree) if isinstance(tree.get(section or command), dict) else tree
        given = tree.get("overwrite")
    return dataclasses.replace(obj, overwrite=bool(given))


def print_config(args: argparse.Namespace, settings: Any) -> bool:
    """With ``--print-config``: print ``settings`` (a dataclass or a dict) as YAML; True if printed."""
    if not getattr(args, "print_config", False):
        return False
    tree = settings_dict(settings) if dataclasses.is_dataclass(settings) else settings
    print(yaml.safe_dump(tree, sort_keys=False), end="")
    return True


def save_beside(settings: Any, output: str | Path, command: str) -> Path:
    """Write the resolved settings as ``<command>.yaml`` in folder ``output`` (or beside a file
    ``output`` as ``<output>.<command>.yaml``); ``--config`` reads it back."""
    out = Path(output)
    folder = out.is_dir() or (not out.suffix and not out.is_file())  # a written file without a suffix is a file
    path = out / f"{command}.yaml" if folder else out.with_name(f"{out.name}.{command}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_settings(settings, path)
    return path
