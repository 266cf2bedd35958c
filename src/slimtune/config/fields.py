"""Settings declared once: a dataclass field carries its help, range and flag; flags derive from it.

Every stage declares one typed dataclass (``PruneSettings``, ``QuantizeSettings``, ...). This
module turns such a dataclass into ``argparse`` flags (:func:`add_flags`), into a validated
instance from ``--config`` YAML plus flags (:func:`settings_from_args`), checks every numeric
field's range and finiteness (:func:`check_ranges`), and writes the resolved settings beside an
output (:func:`save_settings`). ``slimtune validate`` and the pipeline use the same functions, so
the command line, recipes and docs cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from slimtune.io import atomic_write_text


class RecipeError(ValueError):
    """A recipe (YAML file, CLI flag or override) is invalid; the message names the key."""


def setting(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            flag: str | None = None, cli: bool = True, metavar: str | None = None) -> Any:
    """A dataclass field with its help text, numeric range and command-line flag.

    Args:
        default: The default value (lists and dicts are copied per instance); omit for a
            required setting.
        help: One sentence shown by ``--help``, in ``slimtune validate`` errors and the docs.
        ge: Inclusive lower bound for numbers (checked by :func:`check_ranges`).
        gt: Exclusive lower bound.
        le: Inclusive upper bound.
        lt: Exclusive upper bound.
        flag: The flag name when it is not ``--field-name`` (e.g. ``--eval`` for ``eval_path``).
        cli: False keeps the field out of the command line (recipe files only).
        metavar: The value's name in ``--help``.

    Returns:
        A ``dataclasses.field`` whose metadata holds the above.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "flag": flag, "cli": cli,
            "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (``MISSING`` when it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


# --------------------------------------------------------------------------------------------
# Type coercion and ranges
# --------------------------------------------------------------------------------------------


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a RecipeError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        return _coerce_bool(value, key)
    if tp is int:
        return _coerce_int(value, key)
    if tp is float:
        return _coerce_float(value, key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{key}: expected a string, got {value!r}")
    return value


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise RecipeError(f"{key}: expected true/false, got {value!r}")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise RecipeError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise RecipeError(f"{key}: expected an integer, got {value!r}")


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise RecipeError(f"{key}: expected a number, got {value!r}")
    out: float | None = None
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            pass
    if out is None:
        raise RecipeError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(out):
        raise RecipeError(f"{key}: must be a finite number, got {value!r}")
    return out


def check_ranges(obj: Any, prefix: str) -> None:
    """Check every numeric field of dataclass ``obj`` against its declared ``ge/gt/le/lt`` bounds.

    Raises:
        RecipeError: naming ``prefix.field`` (or ``--flag`` when ``prefix`` is a command).
    """
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        values = v if isinstance(v, list) else [v]
        for x in values:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            key = _key(prefix, f)
            if isinstance(x, float) and not math.isfinite(x):
                raise RecipeError(f"{key}: must be a finite number, got {x}")
            if not _in_range(x, f.metadata):
                raise RecipeError(f"{key}: must be {_range_text(f.metadata)}, got {x}")


def _in_range(x: float, m: Any) -> bool:
    return ((m.get("ge") is None or x >= m["ge"]) and (m.get("gt") is None or x > m["gt"])
            and (m.get("le") is None or x <= m["le"]) and (m.get("lt") is None or x < m["lt"]))


def _range_text(m: Any) -> str:
    """'in [0, 1)', '>= 1', '> 0': the declared range in words."""
    lo = ("[", m["ge"]) if m.get("ge") is not None else ("(", m["gt"]) if m.get("gt") is not None else None
    hi = ("]", m["le"]) if m.get("le") is not None else (")", m["lt"]) if m.get("lt") is not None else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    return f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"  # type: ignore[index]


def _key(prefix: str, f: dataclasses.Field) -> str:
    if prefix.startswith("--"):  # a command's flags: name the flag the user typed
        return flag_name(f)
    return f"{prefix}.{f.name}" if prefix else f.name


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, rejecting unknown keys with the valid list.

    ``prefix`` names the section in errors (``train.lr``); ``"--"`` names flags (``--lr``).
    """
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise RecipeError(
            f"unknown key '{prefix}.{unknown[0]}'; valid keys of '{prefix}': {', '.join(names)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: coerce(v, hints[k], _key(prefix, fields[k])) for k, v in values.items()}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and default_of(f) is dataclasses.MISSING]
    if missing:
        f = next(x for x in dataclasses.fields(cls) if x.name == missing[0])
        raise RecipeError(f"{_key(prefix, f)}: is required ({f.metadata.get('help', '')})")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# YAML, overrides
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (naming both lines)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise RecipeError(f"{key_node.start_mark.name}:{line}: duplicate key {key!r} "
                              f"(first given on line {seen[key]})")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file safely; errors name the file (and the line for syntax or duplicate keys)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    text = p.read_text(encoding="utf-8")
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(p)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise RecipeError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (so ``true``, ``3``, ``[q,v]`` work)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating intermediate mappings."""
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``extra`` (neither input is modified)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# Flags derived from a settings dataclass
# --------------------------------------------------------------------------------------------


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a field: its ``flag`` metadata, else ``--field-name``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a command-line flag."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _arg_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    """(argparse type, extra add_argument kwargs) for an annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _arg_type(inner[0]) if len(inner) == 1 else (str, {})
    if origin is Literal:
        return type(args[0]), {"choices": list(args)}
    if origin in (list, tuple):
        inner, extra = _arg_type(args[0] if args else str)
        return inner, {**extra, "nargs": "+"}
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return tp, {}
    return str, {}


def add_flags(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of settings dataclass ``cls`` (plus ``--config``) to ``parser``.

    Every flag defaults to None, so :func:`settings_from_args` knows which ones the user set;
    the real default is shown in the help text and applied from the dataclass.
    """
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", metavar="YAML",
                            help="settings file (YAML; flags given here override it)")
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        if f.name in exclude:
            continue
        tp, extra = _arg_type(hints[f.name])
        default = default_of(f)
        shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        kw: dict[str, Any] = {"dest": f.name, "default": None,
                              "help": f"{f.metadata.get('help', '')} ({shown})".replace("%", "%%"), **extra}
        if tp is not None:
            kw["type"] = tp
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        parser.add_argument(flag_name(f), **kw)


def settings_from_args(cls: type, args: argparse.Namespace, *, section: str | None = None,
                       command: str = "") -> Any:
    """Build and validate ``cls`` from ``--config`` (its ``section`` or top level), then flags.

    Args:
        cls: The settings dataclass.
        args: Parsed arguments of a parser built with :func:`add_flags`.
        section: The YAML section holding these settings in a pipeline recipe (e.g. ``prune``);
            a settings file written by the command itself has them at the top level.
        command: The command's name, for error messages.

    Returns:
        The validated settings (ranges checked, then ``cls.validate()`` if it has one).
    """
    tree: dict[str, Any] = {}
    config = getattr(args, "config", None)
    if config:
        loaded = load_yaml(config)
        if section and isinstance(loaded.get(section), dict):
            loaded = loaded[section]
        where = f"{config}: {section}" if section else str(config)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in loaded if k not in names]
        if unknown:
            raise RecipeError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(names)}")
        tree = dict(loaded)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            tree[f.name] = v
    obj = build_section(cls, tree, "--")
    check_ranges(obj, "--")
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def settings_dict(obj: Any) -> dict[str, Any]:
    """A settings dataclass as a plain YAML-safe dict (what :func:`save_settings` writes)."""
    return dataclasses.asdict(obj)


def save_settings(obj: Any, path: str | os.PathLike) -> None:
    """Write resolved settings as YAML that ``--config`` reads back (atomically)."""
    atomic_write_text(path, yaml.safe_dump(settings_dict(obj), sort_keys=False))


def settings_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field of ``cls``: for ``--help`` epilogs and the docs."""
    rows = []
    for f in dataclasses.fields(cls):
        d = default_of(f)
        rows.append((f"{prefix}{f.name}", "required" if d is dataclasses.MISSING else repr(d),
                     f.metadata.get("help", "")))
    return rows
