"""``slimtune`` command line: a table of commands, each a module of ``slimtune.cli``.

Each command module has a docstring (its ``--help`` description), ``add_arguments(parser)`` and
``run(args) -> int``. Only the module of the command being run is imported, so ``slimtune --help``
stays quick. The library never imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from slimtune import __version__

# command -> (module, one-line help shown by ``slimtune --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "finetune": ("slimtune.cli.finetune", "fine-tune a model (full, LoRA, ...)"),
    "evaluate": ("slimtune.cli.evaluate", "evaluate a saved model on a labelled file (or LM text)"),
    "validate": ("slimtune.cli.validate", "check a recipe (keys, types, files) without loading weights"),
    "distill": ("slimtune.cli.distill", "distil a fine-tuned teacher into a smaller student (logit + intermediate KD)"),
    "augment": ("slimtune.cli.augment", "grow a transfer set for distillation (TinyBERT-style word replacement)"),
    "prune": ("slimtune.cli.prune", "prune a classifier (unstructured/2:4, layers + FFN, vocabulary) or a causal LM (layers, FFN, KV heads, vocabulary)"),
    "quantize": ("slimtune.cli.quantize", "quantize a classifier (int8 on the fastest CPU backend, int4, nf4, k-means)"),
    "bench": ("slimtune.cli.bench", "size, params, latency p50/p95, throughput and memory of model folders, side by side"),
    "run": ("slimtune.cli.run", "run a pipeline recipe: finetune → distill → prune → quantize → evaluate → bench → report"),
    "serve": ("slimtune.cli.serve", "HTTP inference API with dynamic batching (see docs/serving.md)"),
    "compress": ("slimtune.cli.compress", "search distillation x pruning x int8 for the smallest/fastest model within an accuracy drop"),
    "generate": ("slimtune.cli.generate", "generate text with a causal LM (prompt, chat on stdin, or JSONL in/out; streamed)"),
    "export": ("slimtune.cli.export", "export to GGUF (llama.cpp), ONNX (onnxruntime) or clean safetensors, checked against transformers"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``slimtune`` parser.

    Args:
        argv: The arguments about to be parsed. When given, only the named command's module is
            imported (the others appear in ``--help`` from the table); None builds every command.
    """
    parser = argparse.ArgumentParser(prog="slimtune", description="Make a pretrained transformer task-tuned, small and fast.")
    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load pickle weights (pytorch_model.bin, *.pt) from folders you trust; by "
                             "default only safetensors and ONNX are loaded, since a pickle can run code")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (module_name, help_) in COMMANDS.items():
        if argv is not None and name != chosen:
            sub.add_parser(name, help=help_)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slimtune`` console script: user errors are one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv  # --nproc re-launches this command
    if args.allow_pickle:
        os.environ["SLIMTUNE_ALLOW_PICKLE"] = "1"  # read by slimtune.models.loading (ranks inherit it)
    from slimtune.cli.errors import USER_ERRORS  # after parsing: it loads torch (slow for --help)
    from slimtune.data.packaged import expand_args  # after parsing, like USER_ERRORS

    try:
        return int(args.func(expand_args(args)) or 0)  # packaged:NAME/SPLIT flag values -> real files
    except USER_ERRORS as e:
        print(f"slimtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
