"""Write new, unlabelled rows made from a training file by replacing words with their nearest neighbours in the model's input embeddings (and swapping sentence pairs). Give the output to `slimtune distill --unlabeled`: the teacher labels it. The resolved settings are written as OUTPUT.augment.yaml; `--config OUTPUT.augment.yaml` repeats the run (flags override it)."""

from __future__ import annotations

import argparse
import os

from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings
from slimtune.config.fields import RecipeError
from slimtune.data.augment import AugmentConfig, run_augment


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``slimtune augment`` to the ``slimtune`` parser: ``--config``, one flag per setting, ``--print-config``."""
    add_settings_arguments(p, AugmentConfig)


def run(args: argparse.Namespace) -> int:
    """``slimtune augment``: one line per count, or exit 2 with the reason."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = resolve_settings(AugmentConfig, args, "augment")  # checked in full before anything loads
    if print_config(args, cfg):
        return 0
    try:
        info = run_augment(cfg)
    except ValueError as e:
        if type(e) is not ValueError:  # DataError and friends: already user errors
            raise
        raise RecipeError(str(e)) from None
    print(f"wrote {info['rows_out']:,} rows to {cfg.output} (from {info['rows_in']:,}; "
          f"{info['words_with_neighbours']:,} of {info['distinct_words']:,} distinct words have neighbours)")
    return 0
