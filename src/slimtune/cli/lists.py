"""Two conveniences for commands whose flags derive from a settings dataclass.

- :func:`comma_lists`: a list setting whose flag takes ONE comma-separated value
  (``--batch-sizes 1,8``, ``--depths 2,3,4``), as these flags always have. The parts reach
  :func:`slimtune.config.fields.settings_from_args` as strings and are converted, checked
  against the field's type (``Literal`` choices included) and range-checked like a YAML list.
- :func:`require`: a field that is optional in the dataclass (a pipeline section fills it, or
  an in-process caller does not need it) but that the command needs from the user (``--model``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from slimtune.config.fields import RecipeError, flag_name


def split_commas(text: str) -> list[str]:
    """``"1, 8,"`` -> ``["1", "8"]``."""
    return [v.strip() for v in text.split(",") if v.strip()]


def comma_lists(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Make the flags of list fields ``names`` (already added to ``p``) take one comma-separated value.

    Raises:
        ValueError: a name has no flag in ``p`` (a programming error, caught by the tests).
    """
    found = set()
    for action in p._actions:
        if action.dest in names:
            action.nargs, action.type, action.choices = None, split_commas, None
            found.add(action.dest)
    missing = set(names) - found
    if missing:
        raise ValueError(f"comma_lists: no flag for {sorted(missing)}")


def require(settings: Any, names: tuple[str, ...]) -> None:
    """Raise RecipeError ``--flag: is required (help)`` for the first of ``names`` left unset."""
    for f in dataclasses.fields(settings):
        if f.name in names and getattr(settings, f.name) in (None, [], ""):
            raise RecipeError(f"{flag_name(f)}: is required ({f.metadata.get('help', '')})")
