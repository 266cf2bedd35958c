"""Flags of the recipe-based commands (``finetune``, ``distill``), derived from the recipe dataclasses.

Every field of :class:`~slimtune.config.recipe.ModelConfig`, ``DataConfig`` and ``TrainConfig``
(and of ``DistillConfig`` for ``distill``; of the LoRA config, as ``--lora-<field>``, for
``finetune``) gets one flag: ``--field-name``, or the field's ``flag=`` metadata (``--model`` for
``model.name``). A flag's help is its field's help, so flags, recipes and docs cannot drift.

Precedence of settings: defaults < ``--config recipe.yaml`` < flags < ``key.path=value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from slimtune.cli.common import add_print_config, print_config
from slimtune.compress.distill.settings import DistillConfig
from slimtune.config.fields import (
    RecipeError,
    deep_merge,
    default_of,
    flag_name,
    load_yaml,
    parse_override,
    set_path,
)
from slimtune.config.recipe import SECTIONS, Recipe, field_help, resolve
from slimtune.methods import method_names
from slimtune.methods.lora import LoraMethodConfig
from slimtune.train import distributed
from slimtune.train.finetune import resolve_data_defaults

# Top-level Recipe fields with a flag, and the recipe key each one sets.
_TOP_KEYS = {"output": "output", "overwrite": "overwrite", "method_name": "method.name"}


@dataclass(frozen=True)
class RecipeFlag:
    """One command-line flag of a recipe command and the recipe key it sets."""

    flag: str  # "--lr"
    key: str  # "train.lr"
    field: dataclasses.Field
    annotation: Any

    @property
    def dest(self) -> str:
        """The argparse destination: the flag without dashes (``--max-steps`` -> ``max_steps``)."""
        return self.flag.lstrip("-").replace("-", "_")


def _section_flags(cls: type, prefix: str, flag_prefix: str | None = None) -> list[RecipeFlag]:
    """Flags of the fields of dataclass ``cls`` (keys ``prefix.field``); ``flag_prefix`` renames
    them ``--<flag_prefix>-<field>`` (the LoRA method's ``--lora-r``)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flag = f"--{flag_prefix}-{f.name.replace('_', '-')}" if flag_prefix else flag_name(f)
        out.append(RecipeFlag(flag, f"{prefix}.{f.name}", f, hints[f.name]))
    return out


def recipe_flags(command: str) -> list[RecipeFlag]:
    """Every flag of ``slimtune finetune`` or ``slimtune distill``, derived from the dataclasses.

    ``distill`` names ``model.name`` ``--teacher`` (the model it distils from), has the
    ``distill`` section's flags and no ``--lora-*`` shortcuts.
    """
    hints = typing.get_type_hints(Recipe)
    flags = [RecipeFlag(flag_name(f), _TOP_KEYS[f.name], f, hints[f.name])
             for f in dataclasses.fields(Recipe) if f.name in _TOP_KEYS]
    for name, cls in SECTIONS.items():
        flags += _section_flags(cls, name)
    if command == "distill":
        flags = [dataclasses.replace(rf, flag="--teacher") if rf.key == "model.name" else rf for rf in flags]
        flags += _section_flags(DistillConfig, "distill")
    else:
        flags += _section_flags(LoraMethodConfig, "method", flag_prefix="lora")
    seen: dict[str, str] = {}
    for rf in flags:
        if rf.flag in seen:
            raise RuntimeError(f"{command}: flag {rf.flag} of {rf.key} is also the flag of {seen[rf.flag]}")
        seen[rf.flag] = rf.key
    return flags


def _argparse_kwargs(annotation: Any) -> dict[str, Any]:
    """How a flag of this type is read: booleans as ``--x/--no-x``, one value otherwise.

    Lists take one comma-separated value (``--student-layer-map 0,2,5``), never several
    words, so a flag before the ``key.path=value`` overrides cannot swallow them; choices are
    shown but checked by the recipe, so a bad one is a one-line recipe error naming its key.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _argparse_kwargs(inner[0]) if len(inner) == 1 else {"type": str}
    if origin is Literal:
        return {"type": str, "metavar": "{" + ",".join(map(str, args)) + "}"}
    if origin in (list, tuple):
        return {"type": str, "metavar": "A,B,..."}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float):
        return {"type": annotation}
    return {"type": str}


def _help(rf: RecipeFlag) -> str:
    default = default_of(rf.field)
    text = rf.field.metadata.get("help", "")
    if rf.key == "method.name":
        text += f" Registered: {', '.join(sorted(method_names()))}."
    shown = "required" if default is dataclasses.MISSING else f"default {default!r}"
    return f"{text} [{rf.key}; {shown}]".replace("%", "%%")


def add_recipe_flags(p: argparse.ArgumentParser, flags: list[RecipeFlag]) -> None:
    """Add ``--config``, one flag per recipe key in ``flags``, ``--print-config`` and overrides."""
    p.add_argument("--config", metavar="YAML", help="recipe YAML file (flags and key.path=value override it)")
    for rf in flags:
        p.add_argument(rf.flag, dest=rf.dest, default=None, help=_help(rf), **_argparse_kwargs(rf.annotation))
    add_print_config(p)
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="any recipe field, e.g. train.warmup_ratio=0.1")


def recipe_from_args(args: argparse.Namespace, flags: list[RecipeFlag], base: dict[str, Any] | None = None) -> Any:
    """Merge defaults, ``--config``, flags and overrides into a validated Recipe."""
    tree: dict[str, Any] = dict(base or {})
    source = "command line"
    if args.config:
        tree = deep_merge(tree, load_yaml(args.config))
        source = args.config
    for rf in flags:
        v = getattr(args, rf.dest, None)
        if v is not None:
            set_path(tree, rf.key.split("."), v)
    for ov in args.overrides or []:
        path, value = parse_override(ov)
        set_path(tree, path, value)
    return resolve(tree, source)


def recipe_epilog() -> str:
    """Every recipe key with its default and help: the ``--help`` epilog of ``finetune``."""
    lines = ["recipe keys (YAML sections, or key.path=value on the command line):"]
    for key, default, help_ in field_help():
        lines.append(f"  {key:<38} default {default:<10} {help_}")
    return "\n".join(lines)


def add_nproc(p: argparse.ArgumentParser) -> None:
    """``--nproc``: how many processes run the job (a launch option, not a recipe key)."""
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this machine, launched with torch.distributed.run "
                        "(train.batch_size stays the global batch; see docs/distributed.md)")


def start_training(args: argparse.Namespace, recipe: Any) -> int | None:
    """What ``finetune`` and ``distill`` do before training: ``--print-config``, checks, ranks.

    With ``--print-config`` prints the resolved recipe (``data.max_length: auto`` resolved as the
    run will) and returns 0. Otherwise raises RecipeError (exit 2) when ``data.train`` or
    ``output`` is missing, and re-launches the command as ``--nproc`` ranks if asked, returning
    the exit code of ``torch.distributed.run``. None: the caller runs the job itself (single
    process, or one rank under torchrun).
    """
    if getattr(args, "print_config", False):
        resolve_data_defaults(recipe)
        print_config(args, recipe.to_dict())
        return 0
    if recipe.data.train is None:
        raise RecipeError("--train (data.train) is required")
    if recipe.output is None:
        raise RecipeError("--output (output) is required")
    return distributed.relaunch(getattr(args, "argv", sys.argv[1:]), getattr(args, "nproc", None))
