"""The flag contract of ``finetune``, ``distill``, ``augment`` and ``validate``.

Every flag of the four commands is enumerated from :func:`slimtune.cli.main.build_parser`, so a
new flag without a row here fails the test. Each row gives a value and the settings key it must
arrive at; the command runs in-process with ``--print-config`` and the printed YAML must differ
from the same command without the flag at exactly that key (boolean switches are given against
a ``--config`` that says the opposite, so the flag must win). One short real run on the tiny BERT
checks that the flags which change numerics reach ``recipe.yaml``, the training log and autocast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from slimtune.cli.main import build_parser, main

COMMANDS = ("finetune", "distill", "augment", "validate")
NOT_SETTINGS = ("-h", "--help")  # argparse's own

# flag -> (value, key, expected); value None: a switch (no value); key None: not a settings key
# (the printed settings must not change). "{train}" etc. are replaced by the fixture's paths.
Row = tuple[Any, Any, Any]
RECIPE_ROWS: dict[str, Row] = {
    "--config": ("{config}", "train.lr", 0.125),
    "--print-config": (None, None, None),  # what every row runs; alone it prints the defaults
    "--nproc": ("2", None, None),  # a launch option: printed settings unchanged, nothing launched
    "--output": ("runs/x", "output", "runs/x"),
    "--overwrite": (None, "overwrite", True),
    "--no-overwrite": (None, "overwrite", False),
    "--method": ("ia3", "method.name", "ia3"),
    "--task": ("causal-lm", "model.task", "causal-lm"),
    "--dtype": ("bfloat16", "model.dtype", "bfloat16"),
    "--gradient-checkpointing": (None, "model.gradient_checkpointing", True),
    "--no-gradient-checkpointing": (None, "model.gradient_checkpointing", False),
    "--trust-remote-code": (None, "model.trust_remote_code", True),
    "--no-trust-remote-code": (None, "model.trust_remote_code", False),
    "--train": ("{eval}", "data.train", "{eval}"),
    "--eval": ("{eval}", "data.eval", "{eval}"),
    "--text-column": ("review", "data.text_column", "review"),
    "--text-pair-column": ("hypothesis", "data.text_pair_column", "hypothesis"),
    "--label-column": ("stars", "data.label_column", "stars"),
    "--max-length": ("64", "data.max_length", 64),
    "--max-train-samples": ("100", "data.max_train_samples", 100),
    "--max-eval-samples": ("50", "data.max_eval_samples", 50),
    "--skip-bad-rows": (None, "data.skip_bad_rows", True),
    "--no-skip-bad-rows": (None, "data.skip_bad_rows", False),
    "--eval-fraction": ("0.2", "data.eval_fraction", 0.2),
    "--group-by-length": (None, "data.group_by_length", True),
    "--no-group-by-length": (None, "data.group_by_length", False),
    "--encoding": ("latin-1", "data.encoding", "latin-1"),
    "--format": ("chat", "data.format", "chat"),
    "--chat-template": ("fallback", "data.chat_template", "fallback"),
    "--packing": (None, "data.packing", True),
    "--no-packing": (None, "data.packing", False),
    "--epochs": ("2.5", "train.epochs", 2.5),
    "--min-steps": ("40", "train.min_steps", 40),
    "--max-steps": ("7", "train.max_steps", 7),
    "--batch-size": ("4", "train.batch_size", 4),
    "--eval-batch-size": ("8", "train.eval_batch_size", 8),
    "--grad-accum": ("3", "train.grad_accum", 3),
    "--lr": ("0.0003", "train.lr", 3e-4),
    "--weight-decay": ("0.1", "train.weight_decay", 0.1),
    "--warmup-ratio": ("0.2", "train.warmup_ratio", 0.2),
    "--scheduler": ("cosine", "train.scheduler", "cosine"),
    "--max-grad-norm": ("0.5", "train.max_grad_norm", 0.5),
    "--precision": ("bf16", "train.precision", "bf16"),
    "--eval-every": ("25", "train.eval_every", 25),
    "--save-every": ("50", "train.save_every", 50),
    "--keep-checkpoints": ("3", "train.keep_checkpoints", 3),
    "--early-stopping-patience": ("2", "train.early_stopping_patience", 2),
    "--metric": ("macro_f1", "train.metric", "macro_f1"),
    "--seed": ("7", "train.seed", 7),
    "--num-threads": ("2", "train.num_threads", 2),
    "--log-every": ("5", "train.log_every", 5),
    "--resume": (None, "train.resume", True),
    "--no-resume": (None, "train.resume", False),
    "--tensorboard": (None, "train.tensorboard", True),
    "--no-tensorboard": (None, "train.tensorboard", False),
    "--progress": (None, "train.progress", True),
    "--no-progress": (None, "train.progress", False),
    "--fsdp": (None, "train.fsdp", True),
    "--no-fsdp": (None, "train.fsdp", False),
    "--ddp-find-unused-parameters": (None, "train.ddp_find_unused_parameters", True),
    "--no-ddp-find-unused-parameters": (None, "train.ddp_find_unused_parameters", False),
}
LORA = ["--method", "lora"]  # the --lora-* shortcuts set method.* keys: the method must be lora
FINETUNE_ROWS: dict[str, Row] = {
    **RECIPE_ROWS,
    "--model": ("{bert3}", "model.name", "{bert3}"),
    "--lora-r": ("4", "method.r", 4),
    "--lora-alpha": ("8", "method.alpha", 8.0),
    "--lora-dropout": ("0.1", "method.dropout", 0.1),
    "--lora-target-modules": ("query,value", "method.target_modules", ["query", "value"]),
    "--lora-export": ("adapter", "method.export", "adapter"),
}
DISTILL_ROWS: dict[str, Row] = {
    **RECIPE_ROWS,
    "--teacher": ("{bert3}", "model.name", "{bert3}"),
    "--student": ("{bert}", "distill.student", "{bert}"),
    "--student-layers": ("2", "distill.student_layers", 2),
    "--student-layer-map": ("0,1", "distill.student_layer_map", [0, 1]),
    "--student-hidden-size": ("16", "distill.student_hidden_size", 16),
    "--alpha": ("0.25", "distill.alpha", 0.25),
    "--temperature": ("4", "distill.temperature", 4.0),
    "--kl-direction": ("reverse", "distill.kl_direction", "reverse"),
    "--logit-loss": ("mse", "distill.logit_loss", "mse"),
    "--intermediate": (None, "distill.intermediate", True),
    "--no-intermediate": (None, "distill.intermediate", False),
    "--hidden-weight": ("0.5", "distill.hidden_weight", 0.5),
    "--attention-weight": ("0.25", "distill.attention_weight", 0.25),
    "--teacher-dtype": ("bfloat16", "distill.teacher_dtype", "bfloat16"),
    "--teacher-cache": ("off", "distill.teacher_cache", "off"),
    "--cache-dir": ("cache/x", "distill.cache_dir", "cache/x"),
    "--unlabeled": ("{eval}", "distill.unlabeled", ["{eval}"]),
    "--max-unlabeled-samples": ("10", "distill.max_unlabeled_samples", 10),
}
AUGMENT_ROWS: dict[str, Row] = {
    "--config": ("{augment_config}", "copies", 5),
    "--print-config": (None, None, None),
    "--model": ("other/model", "model", "other/model"),
    "--input": ("{eval}", "input", "{eval}"),
    "--output": ("{out2}", "output", "{out2}"),
    "--text-column": ("review", "text_column", "review"),
    "--text-pair-column": ("hypothesis", "text_pair_column", "hypothesis"),
    "--encoding": ("latin-1", "encoding", "latin-1"),
    "--copies": ("3", "copies", 3),
    "--prob": ("0.5", "prob", 0.5),
    "--neighbours": ("4", "neighbours", 4),
    "--swap-pairs": (None, "swap_pairs", True),
    "--no-swap-pairs": (None, "swap_pairs", False),
    "--min-words": ("2", "min_words", 2),
    "--max-rows": ("10", "max_rows", 10),
    "--seed": ("7", "seed", 7),
    "--keep-labels": (None, "keep_labels", True),
    "--no-keep-labels": (None, "keep_labels", False),
}
VALIDATE_ROWS: dict[str, Row] = {
    "--config": ("{config}", "train.lr", 0.125),  # the same as the positional RECIPE
    "--print-config": (None, None, None),
}
ROWS = {"finetune": FINETUNE_ROWS, "distill": DISTILL_ROWS, "augment": AUGMENT_ROWS, "validate": VALIDATE_ROWS}
# Rows that need other flags beside them: the --lora-* shortcuts need the LoRA method; the
# baseline of --student is another student folder (a folder and a layer count are exclusive).
EXTRA = {("finetune", f): LORA for f in FINETUNE_ROWS if f.startswith("--lora-")}
STUDENT_INSTEAD = {"--student": ["--student", "{bert3}"], "--student-layer-map": ["--student-layers", "2"]}


def command_options(command: str) -> list[str]:
    """Every option string of ``slimtune COMMAND`` (``--x`` and ``--no-x`` both), from the parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(o for a in sub.choices[command]._actions for o in a.option_strings if o not in NOT_SETTINGS)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def nest(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value  # type: ignore[return-value]


@pytest.fixture(scope="module")
def paths(tiny_assets, tiny_bert_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("flags")
    train, ev = str(tiny_assets.tsv(24)), str(tiny_assets.tsv(12, seed=3))
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": str(tiny_bert_dir)}, "data": {"train": train},
                                      "train": {"lr": 0.125}}))
    augment_config = root / "aug.augment.yaml"
    augment_config.write_text(yaml.safe_dump({"copies": 5}))
    return {"bert": str(tiny_bert_dir), "bert3": str(tiny_assets.bert(layers=3)), "train": train, "eval": ev, "config": str(config),
            "augment_config": str(augment_config), "out": str(root / "aug.tsv"), "out2": str(root / "aug2.tsv"),
            "root": str(root)}


DERIVED = ("data.max_length", "train.min_steps")
METHOD_DEFAULTED = ("train.lr", "train.epochs", "train.min_steps")


def _fill(value: Any, paths: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**paths)
    if isinstance(value, list):
        return [_fill(v, paths) for v in value]
    return value


def _required(command: str, flag: str, paths: dict[str, str]) -> list[str]:
    student = _fill(STUDENT_INSTEAD.get(flag, ["--student-layers", "1"]), paths)
    return {"finetune": ["--model", paths["bert"], "--train", paths["train"]],
            "distill": ["--teacher", paths["bert"], "--train", paths["train"], *student],
            "augment": ["--model", paths["bert"], "--input", paths["train"], "--output", paths["out"]],
            "validate": [paths["config"]]}[command]


def _print_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"{' '.join(argv)}: exit {rc}: {err.strip()[-500:]}"
    return flatten(yaml.safe_load(out))


def _check_row(command: str, flag: str, paths: dict[str, str], tmp: Path,
               capsys: pytest.CaptureFixture[str]) -> None:
    value, key, expected = ROWS[command][flag]
    value, expected = _fill(value, paths), _fill(expected, paths)
    base = [command, *_required(command, flag, paths), *EXTRA.get((command, flag), [])]
    if command == "validate" and flag == "--config":
        base = [command]  # --config FILE instead of the positional FILE: the same settings
        want = _print_config([command, paths["config"], "--print-config"], capsys)
    elif value is None and key is not None:  # a switch: against a --config that says the opposite
        cfg = tmp / f"{command}{flag}.yaml"
        cfg.write_text(yaml.safe_dump(nest(key, not expected)))
        base += ["--config", str(cfg)]
        want = _print_config([*base, "--print-config"], capsys)
        assert want[key] is (not expected), (command, flag)
    else:
        want = _print_config([*base, "--print-config"], capsys)
    got = _print_config([*base, flag, *([] if value is None else [value]), "--print-config"], capsys)
    changed = {k for k in got.keys() | want.keys() if got.get(k) != want.get(k)}
    if key is None or (command == "validate" and flag == "--config"):
        assert not changed, (command, flag, changed)
        if key is not None:
            assert got[key] == expected
        return
    if key == "method.name":  # another method: its own method.* settings come with it
        changed = {k for k in changed if not k.startswith("method.")} | {key}
    if key in ("method.name", "model.task"):  # the method's declared defaults (lr, epochs, floor) are per task
        changed = {k for k in changed if k not in METHOD_DEFAULTED} | {key}
    # derived values (issue #23): provenance records every change; data.max_length: auto follows the
    # data, model and columns; the step floor train.min_steps is 0 once epochs or max_steps are given
    changed = {k for k in changed if k == key or not (k.startswith("provenance.") or k in DERIVED)}
    assert changed == {key}, (command, flag, changed)
    assert got[key] == expected, (command, flag, got[key], expected)


def test_every_flag_arrives_at_its_key(paths: dict[str, str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    missing = {c: sorted(set(command_options(c)) - set(ROWS[c])) for c in COMMANDS}
    assert not any(missing.values()), f"flags without a row in the contract table: {missing}"
    stale = {c: sorted(set(ROWS[c]) - set(command_options(c))) for c in COMMANDS}
    assert not any(stale.values()), f"rows for flags that no longer exist: {stale}"
    pairs = [(c, f) for c in COMMANDS for f in command_options(c)]
    for command, flag in pairs:
        _check_row(command, flag, paths, tmp_path, capsys)
    with capsys.disabled():
        counts = {c: sum(1 for x, _ in pairs if x == c) for c in COMMANDS}
        print(f"\nflag contract: {len(pairs)} command x flag pairs covered {counts}")
    assert len(pairs) >= 150


def test_print_config_loads_no_weights(paths: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """--print-config stops before any model is read: a model name that does not exist is fine."""
    for argv in (["finetune", "--model", "no/such/model", "--train", paths["train"]],
                 ["distill", "--teacher", "no/such/model", "--train", paths["train"], "--student-layers", "1"],
                 ["augment", "--model", "no/such/model", "--input", paths["train"], "--output", paths["out"]]):
        assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
        printed = flatten(yaml.safe_load(capsys.readouterr().out))
        assert printed.get("model.name", printed.get("model")) == "no/such/model"
    assert not Path(paths["out"]).exists()


def test_numeric_flags_reach_recipe_log_and_autocast(tiny_assets, tiny_bert_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--lr, --max-grad-norm and --precision in one short real run: recipe.yaml holds them, the
    log's learning rate is --lr (constant schedule), the gradient norm is logged while clipping,
    and bf16 autocast changes the first step's loss (same weights, same batch) a little."""
    monkeypatch.setenv("SLIMTUNE_NO_PROGRESS", "1")
    common = ["finetune", "--model", str(tiny_bert_dir), "--train", str(tiny_assets.tsv(64, seed=1)),
              "--max-steps", "3", "--batch-size", "8", "--max-length", "16", "--log-every", "1",
              "--scheduler", "constant", "--warmup-ratio", "0", "--no-tensorboard", "--no-progress"]
    runs = {"bf16": ["--lr", "0.003", "--max-grad-norm", "0.5", "--precision", "bf16"],
            "fp32": ["--lr", "0.001", "--max-grad-norm", "0", "--precision", "fp32"]}
    logs = {}
    for name, flags in runs.items():
        out = tmp_path / name
        assert main([*common, *flags, "--output", str(out)]) == 0
        recipe = yaml.safe_load((out / "recipe.yaml").read_text())["train"]
        assert (recipe["lr"], recipe["max_grad_norm"], recipe["precision"]) == (
            float(flags[1]), float(flags[3]), flags[5])
        events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        logs[name] = [e for e in events if "train/loss" in e]
        assert [e["step"] for e in logs[name]] == [1, 2, 3]
        assert all(e["train/lr"] == pytest.approx(float(flags[1])) for e in logs[name])
        assert json.loads((out / "metrics.json").read_text())["train"]["precision"] == name
    assert all(e["train/grad_norm"] > 0 for e in logs["bf16"])  # clipping on: the norm is logged
    assert not any("train/grad_norm" in e for e in logs["fp32"])  # --max-grad-norm 0: no clipping
    first = logs["bf16"][0]["train/loss"], logs["fp32"][0]["train/loss"]
    assert first[0] != first[1] and first[0] == pytest.approx(first[1], abs=0.05), first
