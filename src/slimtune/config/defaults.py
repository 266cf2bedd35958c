"""Method-aware defaults and where every defaulted value came from (its provenance).

Some recipe fields have no single good default: the learning rate of full fine-tuning (1e-4 for
a small encoder) is 10x too low for LoRA and 50x too low for IA3. Such fields default to
*unset* (``None``) and are filled here from the method's own declared ``defaults`` (a dict on
the Method class, next to its code: ``{"train.lr": 1e-3, ...}``, with optional per-task
overrides in ``task_defaults``), else from :data:`FALLBACK`. ``data.max_length: auto`` is
resolved later, from the data (:mod:`slimtune.train.auto`), because it needs the tokenizer.

Every such value gets a provenance entry, ``{"value": 0.001, "source": "default of method lora"}``
(or ``"user"``, ``"auto: ..."``), saved as the ``provenance:`` section of ``recipe.yaml`` and
printed at the start of a run. A recipe read back keeps the recorded source of every value it
did not change, so re-running a saved ``recipe.yaml`` repeats the run and says why each value is
what it is.
"""

from __future__ import annotations

from typing import Any

# The keys a method may default, and the value used when a method declares none (the
# pre-method-defaults values of slimtune, so a third-party method keeps its old behaviour).
FALLBACK: dict[str, Any] = {"train.lr": 5e-5, "train.epochs": 3.0, "train.min_steps": 0}
AUTO_KEYS = tuple(FALLBACK)


def method_defaults(method: Any, task: str) -> dict[str, Any]:
    """The defaults ``method`` declares for ``task``: its ``defaults`` updated by ``task_defaults[task]``."""
    out = dict(getattr(method, "defaults", {}) or {})
    out.update((getattr(method, "task_defaults", {}) or {}).get(task, {}))
    unknown = [k for k in out if k not in FALLBACK]
    if unknown:
        raise ValueError(f"method {getattr(method, 'name', method)!r} declares a default for {unknown[0]!r}; "
                         f"methods may default: {', '.join(FALLBACK)}")
    return out


def _get(recipe: Any, key: str) -> Any:
    sec, name = key.split(".")
    return getattr(getattr(recipe, sec), name)


def _set(recipe: Any, key: str, value: Any) -> None:
    sec, name = key.split(".")
    setattr(getattr(recipe, sec), name, value)


def apply_method_defaults(recipe: Any, method: Any, recorded: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Fill the unset (None) :data:`AUTO_KEYS` of ``recipe`` from ``method``'s defaults; return the provenance.

    Args:
        recipe: a Recipe whose sections are built (values the user gave are set, the others None).
        method: the registered method (``recipe.method_name``).
        recorded: the ``provenance`` section of a recipe read back (``recipe.yaml``): a value
            still equal to its recorded value keeps the recorded source.

    The step floor ``train.min_steps`` only applies when the run length is the default one:
    with ``train.epochs`` or ``train.max_steps`` given, an unset floor is 0 (the user's epochs run).
    """
    declared = method_defaults(method, recipe.model.task)
    prov: dict[str, dict[str, Any]] = {}
    length_given = _get(recipe, "train.epochs") is not None or recipe.train.max_steps > 0
    for key in AUTO_KEYS:
        value = _get(recipe, key)
        if value == "auto":
            source = "auto: lr range test at the start of the run (slimtune.train.lr_find)"
        elif value is not None:
            source = "user"
        elif key == "train.min_steps" and length_given:
            value, source = 0, "auto: 0 (train.epochs or train.max_steps given)"
        elif key in declared:
            value, source = declared[key], f"default of method {method.name}"
        else:
            value, source = FALLBACK[key], "slimtune default (the method declares none)"
        _set(recipe, key, value)
        prov[key] = {"value": value, "source": source}
    for key, entry in (recorded or {}).items():
        if key in prov and isinstance(entry, dict) and entry.get("value") == prov[key]["value"]:
            prov[key]["source"] = entry.get("source", prov[key]["source"])
    return prov


def provenance_lines(provenance: dict[str, dict[str, Any]]) -> list[str]:
    """``train.lr = 0.001 (default of method lora)``: one line per value, for the start of a run."""
    return [f"{k} = {v['value']!r} ({v['source']})" for k, v in provenance.items()]
