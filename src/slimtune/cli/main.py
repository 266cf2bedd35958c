"""``slimtune`` command line: finetune, evaluate, validate (and the commands other modules add).

Precedence of settings: defaults < ``--config recipe.yaml`` < flags < ``key.path=value``.
Imports stay inside the command functions so ``slimtune --help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Any

# Modules that add their own sub-commands through ``add_cli(subparsers)``; each keeps its
# top-level imports light (stdlib only) so building the parser stays fast. Missing ones are skipped.
COMMAND_MODULES: list[str] = ["slimtune.compress.distill.recipe", "slimtune.data.augment", "slimtune.compress.prune.recipe", "slimtune.compress.quant.recipe",
                              "slimtune.benchmark.latency", "slimtune.pipeline.run", "slimtune.serve.app", "slimtune.pipeline.search"]

# flag name -> recipe key path
FINETUNE_FLAGS: dict[str, tuple[str, type, str]] = {
    "model": ("model.name", str, "model path, hub id or alias (minilm, minilm-l3, smollm2)"),
    "task": ("model.task", str, "classification | causal-lm"),
    "train": ("data.train", str, "training file (CSV/TSV/JSONL, or .txt for causal-lm)"),
    "eval": ("data.eval", str, "evaluation file"),
    "output": ("output", str, "output directory"),
    "method": ("method.name", str, "fine-tuning method (full, lora, ...)"),
    "epochs": ("train.epochs", float, "training epochs"),
    "max_steps": ("train.max_steps", int, "optimizer steps (overrides epochs)"),
    "batch_size": ("train.batch_size", int, "micro-batch size"),
    "grad_accum": ("train.grad_accum", int, "gradient accumulation steps"),
    "lr": ("train.lr", float, "peak learning rate"),
    "precision": ("train.precision", str, "auto | fp32 | bf16 | fp16"),
    "max_length": ("data.max_length", int, "max tokens per example / block"),
    "seed": ("train.seed", int, "random seed"),
    "text_column": ("data.text_column", str, "text column name"),
    "text_pair_column": ("data.text_pair_column", str, "second text column (pairs)"),
    "label_column": ("data.label_column", str, "label column name"),
    "max_train_samples": ("data.max_train_samples", int, "subsample the training set"),
    "max_eval_samples": ("data.max_eval_samples", int, "subsample the evaluation set"),
    "lora_r": ("method.r", int, "LoRA rank"),
    "lora_alpha": ("method.alpha", float, "LoRA alpha"),
}


def add_recipe_flags(p: argparse.ArgumentParser, flags: dict[str, tuple[str, type, str]]) -> None:
    """Add ``--flag`` options that map to recipe keys, plus ``--config`` and overrides."""
    p.add_argument("--config", help="recipe YAML file (flags and key=value override it)")
    for name, (key, tp, help_) in flags.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, type=tp, default=None, help=f"{help_} [{key}]")
    p.add_argument("--skip-bad-rows", action="store_true", default=None, help="skip malformed rows and report the count [data.skip_bad_rows]")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="any recipe field, e.g. train.warmup_ratio=0.1")


def recipe_from_args(args: argparse.Namespace, flags: dict[str, tuple[str, type, str]],
                     base: dict[str, Any] | None = None) -> Any:
    """Merge defaults, ``--config``, flags and overrides into a validated Recipe."""
    from slimtune.config.recipe import deep_merge, load_yaml, parse_override, resolve, set_path

    tree: dict[str, Any] = dict(base or {})
    source = "command line"
    if args.config:
        tree = deep_merge(tree, load_yaml(args.config))
        source = args.config
    for name, (key, _, _) in flags.items():
        v = getattr(args, name, None)
        if v is not None:
            set_path(tree, key.split("."), v)
    if getattr(args, "skip_bad_rows", None):
        set_path(tree, ["data", "skip_bad_rows"], True)
    for ov in args.overrides or []:
        path, value = parse_override(ov)
        set_path(tree, path, value)
    return resolve(tree, source)


def _recipe_epilog() -> str:
    from slimtune.config.recipe import field_help

    lines = ["recipe keys (YAML sections, or key.path=value on the command line):"]
    for key, default, help_ in field_help():
        lines.append(f"  {key:<38} default {default:<10} {help_}")
    return "\n".join(lines)


def relaunch_training(args: argparse.Namespace, recipe: Any, command: str) -> int | None:
    """Check a training command's recipe, then re-launch the command as ``--nproc`` ranks if asked.

    Raises SystemExit when ``data.train`` or ``output`` is missing. Returns the exit code of
    ``torch.distributed.run`` when this process only launched the ranks, else None: the caller
    runs the job itself (single process, or one rank under torchrun).
    """
    if recipe.data.train is None:
        raise SystemExit(f"slimtune {command}: --train (data.train) is required")
    if recipe.output is None:
        raise SystemExit(f"slimtune {command}: --output is required")
    from slimtune.train import distributed

    return distributed.relaunch(getattr(args, "argv", sys.argv[1:]), getattr(args, "nproc", None))


def cmd_finetune(args: argparse.Namespace) -> int:
    from slimtune.train import distributed
    from slimtune.train.finetune import print_finetune_result, run_finetune

    recipe = recipe_from_args(args, FINETUNE_FLAGS)
    if recipe.distill is not None:  # fine-tuning it would train the teacher (model.name), not a student
        from slimtune.config.recipe import RecipeError

        raise RecipeError(f"{args.config or 'recipe'}: has a 'distill' section (a slimtune distill recipe); "
                          "run it with 'slimtune distill --config', or remove the section")
    rc = relaunch_training(args, recipe, "finetune")
    if rc is not None:  # this process only launched the ranks (torch.distributed.run)
        return rc
    try:
        result = run_finetune(recipe)
        if distributed.is_main():
            print_finetune_result(result, recipe.output)
    finally:
        distributed.teardown()
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from slimtune.config.recipe import deep_merge, load_yaml, parse_override, resolve, set_path
    from slimtune.models.loading import check_exists

    tree = load_yaml(args.recipe)
    for ov in args.overrides or []:
        path, value = parse_override(ov)
        set_path(tree, path, value)
    if "stages" in tree or "finetune" in tree:  # a `slimtune run` pipeline recipe
        from slimtune.pipeline.run import validate_tree

        plan = validate_tree(tree, args.recipe)
        print(f"{args.recipe}: OK (pipeline: {' -> '.join(plan.stages)}; output {plan.output})")
        return 0
    recipe = resolve(deep_merge({}, tree), args.recipe)
    check_exists(recipe.model.name)
    extra = ", distill" if recipe.distill is not None else ""
    print(f"{args.recipe}: OK (model {recipe.model.name}, task {recipe.model.task}, method {recipe.method_name}{extra})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from slimtune.evaluate.evaluator import format_report, run_evaluate

    result = run_evaluate(args.model, args.eval, output=args.output, batch_size=args.batch_size,
                          max_length=args.max_length, text_column=args.text_column,
                          text_pair_column=args.text_pair_column, label_column=args.label_column,
                          encoding=args.encoding, skip_bad_rows=args.skip_bad_rows)
    print(format_report(result, title=f"{args.model} on {args.eval}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands from this module and COMMAND_MODULES)."""
    parser = argparse.ArgumentParser(prog="slimtune", description="Make a pretrained transformer task-tuned, small and fast.")
    parser.add_argument("--version", action="version", version=f"slimtune {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    want_epilog = "-h" in sys.argv or "--help" in sys.argv
    p = sub.add_parser("finetune", help="fine-tune a model (full, LoRA, ...)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_recipe_epilog() if want_epilog else None)
    add_recipe_flags(p, FINETUNE_FLAGS)
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this machine, launched with torch.distributed.run "
                        "(train.batch_size stays the global batch; see docs/distributed.md)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="evaluate a saved model on a labelled file (or LM text)")
    p.add_argument("--model", required=True, help="model folder written by slimtune (or any HF folder)")
    p.add_argument("--eval", required=True, help="evaluation file (CSV/TSV/JSONL, or .txt for causal-lm)")
    p.add_argument("--output", help="metrics JSON to write (default: MODEL/metrics.json)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None, help="default: the model's recipe.yaml, else 128")
    p.add_argument("--text-column")
    p.add_argument("--text-pair-column")
    p.add_argument("--label-column")
    p.add_argument("--encoding", default=None)
    p.add_argument("--skip-bad-rows", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("validate", help="check a recipe (keys, types, files) without loading weights")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.set_defaults(func=cmd_validate)

    for mod in COMMAND_MODULES:
        if importlib.util.find_spec(mod) is not None:
            module = importlib.import_module(mod)
            if hasattr(module, "add_cli"):
                module.add_cli(sub)
    return parser


def _version() -> str:
    from slimtune import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slimtune`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # --nproc re-launches this command
    from slimtune.cli.errors import USER_ERRORS

    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"slimtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
