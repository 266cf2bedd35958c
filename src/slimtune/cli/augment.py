"""Write new, unlabelled rows made from a training file by replacing words with their nearest neighbours in the model's input embeddings (and swapping sentence pairs). Give the output to `slimtune distill --unlabeled`: the teacher labels it."""

from __future__ import annotations

import argparse
import dataclasses
import os

from slimtune.config.fields import RecipeError
from slimtune.data.augment import AugmentConfig, run_augment


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``slimtune augment`` to the ``slimtune`` parser."""
    p.add_argument("--model", required=True, help="model folder whose tokenizer and embeddings pick the neighbours (the teacher)")
    p.add_argument("--input", required=True, help="training file (CSV/TSV/JSONL); its label column is ignored")
    p.add_argument("--output", required=True, help="TSV file to write (plus OUTPUT.json)")
    for f in dataclasses.fields(AugmentConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            typ = int if f.name != "prob" else float
            p.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"])
    p.add_argument("--text-column")
    p.add_argument("--text-pair-column")
    p.add_argument("--encoding", default=None)


def run(args: argparse.Namespace) -> int:
    """``slimtune augment``: one line per count, or exit 2 with the reason."""

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = AugmentConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AugmentConfig)})
    try:
        info = run_augment(args.model, args.input, args.output, cfg, text_column=args.text_column,
                           text_pair_column=args.text_pair_column, encoding=args.encoding)
    except ValueError as e:
        if type(e) is not ValueError:  # DataError and friends: already user errors
            raise
        raise RecipeError(str(e)) from None
    print(f"wrote {info['rows_out']:,} rows to {args.output} (from {info['rows_in']:,}; "
          f"{info['words_with_neighbours']:,} of {info['distinct_words']:,} distinct words have neighbours)")
    return 0

