"""Flag contract of ``compress``, ``bench``, ``serve``, ``evaluate`` and ``run``.

Every flag of these commands is enumerated from ``slimtune.cli.main.build_parser()``; each has a
row in :data:`ROWS` giving a non-default value and the key of the resolved settings it must
arrive at. A row runs ``main([cmd, *required, flag, *value, "--print-config"])`` and reads the
printed YAML back, so a new flag without a row, a flag wired to the wrong field, or a flag that
no longer reaches the settings fails here. Flags that change numbers or gates are then run for
real on tiny fixtures (``bench --seq-lens``, ``evaluate --max-length``, ``compress
--max-accuracy-drop``, ``serve --max-texts``, ``run --force`` ...) and the result must change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from slimtune.cli.main import build_parser, main

COMMANDS = ("compress", "bench", "serve", "evaluate", "run")
ACTION = "<action>"  # a run switch, not a setting: its behaviour is checked by a real run (test named in the row)
SELF = "<print-config>"  # the mechanism every row uses: exit 0, YAML out, nothing written

# cmd -> the arguments every row of that command starts with
REQUIRED: dict[str, list[str]] = {
    "compress": ["--model", "{bert}", "--train", "{train}", "--eval", "{eval}", "--output", "{root}/c",
                 "--max-accuracy-drop", "1"],
    "bench": ["--model", "{bert}"],
    "serve": ["--model", "{bert}"],
    "evaluate": ["--model", "{bert}", "--eval", "{eval}"],
    "run": ["{recipe}"],
}

# cmd -> flag -> (arguments after the required ones, key in the printed YAML, value it must have)
ROWS: dict[str, dict[str, tuple[list[str], str, Any]]] = {
    "compress": {
        "--config": (["--config", "{compress_yaml}"], "budget_minutes", 7.0),
        "--model": (["--model", "{bert2}"], "model", "{bert2}"),
        "--train": (["--train", "{train2}"], "train", "{train2}"),
        "--eval": (["--eval", "{eval2}"], "eval", "{eval2}"),
        "--output": (["--output", "{root}/c2"], "output", "{root}/c2"),
        "--max-accuracy-drop": (["--max-accuracy-drop", "2.5"], "max_accuracy_drop", 2.5),
        "--max-perplexity-increase": (["--max-perplexity-increase", "2.5"], "max_perplexity_increase", 2.5),
        "--keep-layers": (["--keep-layers", "0.5,3"], "keep_layers", [0.5, 3.0]),
        "--test": (["--test", "{eval2}"], "test", "{eval2}"),
        "--max-size-mb": (["--max-size-mb", "9.5"], "max_size_mb", 9.5),
        "--max-latency-ms": (["--max-latency-ms", "3"], "max_latency_ms", 3.0),
        "--budget-minutes": (["--budget-minutes", "5"], "budget_minutes", 5.0),
        "--depths": (["--depths", "1,3"], "depths", [1, 3]),
        "--ffn": (["--ffn", "0.25,0.75"], "ffn", [0.25, 0.75]),
        "--vocab": (["--no-vocab", "--vocab"], "vocab", True),
        "--no-vocab": (["--no-vocab"], "vocab", False),
        "--quant": (["--quant", "int8,none"], "quant", ["int8", "none"]),
        "--max-train-samples": (["--max-train-samples", "100"], "max_train_samples", 100),
        "--max-eval-samples": (["--max-eval-samples", "10"], "max_eval_samples", 10),
        "--max-length": (["--max-length", "64"], "max_length", 64),
        "--epochs": (["--epochs", "2.5"], "epochs", 2.5),
        "--lr": (["--lr", "0.001"], "lr", 0.001),
        "--batch-size": (["--batch-size", "8"], "batch_size", 8),
        "--recover-steps": (["--recover-steps", "3"], "recover_steps", 3),
        "--static-dims": (["--static-dims", "32,8"], "static_dims", [32, 8]),
        "--static-epochs": (["--static-epochs", "2.5"], "static_epochs", 2.5),
        "--alpha": (["--alpha", "0.25"], "alpha", 0.25),
        "--temperature": (["--temperature", "4"], "temperature", 4.0),
        "--threads": (["--threads", "2"], "threads", 2),
        "--bench-batch-size": (["--bench-batch-size", "4"], "bench_batch_size", 4),
        "--bench-seq-len": (["--bench-seq-len", "32"], "bench_seq_len", 32),
        "--bench-repeats": (["--bench-repeats", "7"], "bench_repeats", 7),
        "--prefer": (["--prefer", "size"], "prefer", "size"),
        "--seed": (["--seed", "7"], "seed", 7),
        "--print-config": ([], SELF, None),
    },
    "bench": {
        "--config": (["--config", "{bench_yaml}"], "repeats", 9),  # a pipeline recipe: its bench: section
        "--model": (["--model", "{bert}", "{bert2}"], "model", ["{bert}", "{bert2}"]),
        "--batch-sizes": (["--batch-sizes", "2,4"], "batch_sizes", [2, 4]),
        "--seq-lens": (["--seq-lens", "8,16"], "seq_lens", [8, 16]),
        "--threads": (["--threads", "2"], "threads", [2]),
        "--repeats": (["--repeats", "3"], "repeats", 3),
        "--warmup": (["--warmup", "1"], "warmup", 1),
        "--min-seconds": (["--min-seconds", "0.5"], "min_seconds", 0.5),
        "--eval": (["--eval", "{eval}"], "eval", "{eval}"),
        "--max-eval-samples": (["--max-eval-samples", "5"], "max_eval_samples", 5),
        "--output": (["--output", "{root}/b.json"], "output", "{root}/b.json"),
        "--print-config": ([], SELF, None),
    },
    "serve": {
        "--config": (["--config", "{serve_yaml}"], "port", 9001),
        "--model": (["--model", "{bert2}"], "model", "{bert2}"),
        "--model-id": (["--model-id", "my-llm"], "model_id", "my-llm"),
        "--host": (["--host", "0.0.0.0"], "host", "0.0.0.0"),
        "--port": (["--port", "8123"], "port", 8123),
        "--max-batch-size": (["--max-batch-size", "4"], "max_batch_size", 4),
        "--max-wait-ms": (["--max-wait-ms", "2.5"], "max_wait_ms", 2.5),
        "--max-batch-tokens": (["--max-batch-tokens", "4096"], "max_batch_tokens", 4096),
        "--max-queue": (["--max-queue", "7"], "max_queue", 7),
        "--api-key": (["--api-key", "s3cret"], "api_key", "***"),  # masked when printed
        "--max-texts": (["--max-texts", "3"], "max_texts", 3),
        "--max-chars": (["--max-chars", "50"], "max_chars", 50),
        "--max-new-tokens": (["--max-new-tokens", "9"], "max_new_tokens", 9),
        "--max-body-bytes": (["--max-body-bytes", "5000"], "max_body_bytes", 5000),
        "--request-timeout-s": (["--request-timeout-s", "1.5"], "request_timeout_s", 1.5),
        "--threads": (["--threads", "2"], "threads", 2),
        "--device": (["--device", "cuda:1"], "device", "cuda:1"),  # the machine is checked when serving starts
        "--forward-cost-tokens": (["--forward-cost-tokens", "0"], "forward_cost_tokens", 0),
        "--max-connections": (["--max-connections", "50"], "max_connections", 50),
        "--header-timeout-s": (["--header-timeout-s", "2.5"], "header_timeout_s", 2.5),
        "--body-timeout-s": (["--body-timeout-s", "4"], "body_timeout_s", 4.0),
        "--keep-alive-s": (["--keep-alive-s", "1.5"], "keep_alive_s", 1.5),
        "--drain-s": (["--drain-s", "3"], "drain_s", 3.0),
        "--log-level": (["--log-level", "debug"], "log_level", "debug"),
        "--access-log": (["--access-log"], "access_log", True),
        "--no-access-log": (["--access-log", "--no-access-log"], "access_log", False),
        "--print-config": ([], SELF, None),
    },
    "evaluate": {
        "--config": (["--config", "{evaluate_yaml}"], "batch_size", 7),  # a pipeline recipe: its evaluate: section
        "--model": (["--model", "{bert2}"], "model", "{bert2}"),
        "--eval": (["--eval", "{eval2}"], "eval", "{eval2}"),
        "--output": (["--output", "{root}/m.json"], "output", "{root}/m.json"),
        "--batch-size": (["--batch-size", "8"], "batch_size", 8),
        "--max-length": (["--max-length", "32"], "max_length", 32),
        "--max-eval-samples": (["--max-eval-samples", "5"], "max_eval_samples", 5),
        "--text-column": (["--text-column", "sentence"], "text_column", "sentence"),
        "--text-pair-column": (["--text-pair-column", "s2"], "text_pair_column", "s2"),
        "--label-column": (["--label-column", "label"], "label_column", "label"),
        "--encoding": (["--encoding", "latin-1"], "encoding", "latin-1"),
        "--skip-bad-rows": (["--skip-bad-rows"], "skip_bad_rows", True),
        "--no-skip-bad-rows": (["--skip-bad-rows", "--no-skip-bad-rows"], "skip_bad_rows", False),
        "--print-config": ([], SELF, None),
    },
    "run": {
        "--config": (["--config", "{recipe2}"], "output", "{root}/run2"),  # instead of RECIPE (dropped)
        "--force": (["--force"], ACTION, "test_run_force_reruns_and_dry_run_writes_nothing"),
        "--dry-run": (["--dry-run"], ACTION, "test_run_force_reruns_and_dry_run_writes_nothing"),
        "--print-config": ([], SELF, None),
    },
}


def flags_of(cmd: str) -> list[str]:
    """Every option string of ``slimtune CMD`` (both forms of a boolean), as the real parser has them
    (``build_parser([cmd])``: the parser ``main`` builds for that command, importing only its module)."""
    parser = build_parser([cmd])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    return sorted(o for a in sub._actions for o in a.option_strings if o not in ("-h", "--help"))


PAIRS = [(cmd, flag) for cmd in COMMANDS for flag in flags_of(cmd)]


def _fill(value: Any, paths: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**paths)
    if isinstance(value, list):
        return [_fill(v, paths) for v in value]
    return value


def _dig(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory, tiny_assets) -> dict[str, str]:
    """Tiny models and files every row may name, plus the ``--config`` files of the rows."""
    root = tmp_path_factory.mktemp("flags")
    p = {"root": str(root), "bert": str(tiny_assets.bert()), "bert2": str(tiny_assets.bert(seed=1)),
         "train": str(tiny_assets.tsv(64)), "train2": str(tiny_assets.tsv(32, 3)),
         "eval": str(tiny_assets.tsv(24, 1)), "eval2": str(tiny_assets.tsv(24, 2))}
    configs = {"compress_yaml": {"budget_minutes": 7},  # a flat file of the command's fields
               "bench_yaml": {"output": "ignored", "bench": {"repeats": 9}},  # a recipe's section
               "serve_yaml": {"port": 9001},
               "evaluate_yaml": {"evaluate": {"batch_size": 7}}}
    for name, tree in configs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(tree))
        p[name] = str(root / f"{name}.yaml")
    for name, out in (("recipe", "run1"), ("recipe2", "run2")):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(_recipe(p, str(root / out))))
        p[name] = str(root / f"{name}.yaml")
    return p


def _recipe(p: dict[str, str], output: str) -> dict[str, Any]:
    """A two-stage pipeline on the input model: evaluate (on a held-out file) and report."""
    return {"output": output, "model": {"name": p["bert"]},
            "data": {"train": p["train"], "eval": p["eval"], "max_length": 16},
            "evaluate": {"eval": p["eval2"], "max_eval_samples": 12}, "report": {"title": "flags"}}


def _printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"{argv}: exit {rc}: {err}"
    return yaml.safe_load(out)


# --------------------------------------------------------------------------------------------
# Every flag reaches its setting (--print-config)
# --------------------------------------------------------------------------------------------


def test_every_flag_has_a_row_and_the_count() -> None:
    """The table covers exactly the parser's flags (a new flag needs a row; a stale row fails too)."""
    for cmd in COMMANDS:
        assert set(ROWS[cmd]) == set(flags_of(cmd)), (cmd, set(flags_of(cmd)) ^ set(ROWS[cmd]))
    n = len(PAIRS)
    print(f"flag contract: {n} command x flag pairs covered "
          + ", ".join(f"{c} {len(flags_of(c))}" for c in COMMANDS))
    assert n == sum(len(r) for r in ROWS.values()) == 92


@pytest.mark.parametrize("cmd, flag", PAIRS, ids=[f"{c} {f}" for c, f in PAIRS])
def test_flag_reaches_its_setting(cmd: str, flag: str, paths: dict[str, str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert flag in ROWS[cmd], f"slimtune {cmd} {flag}: no row in ROWS (add one: value, settings key, expected)"
    args, key, want = ROWS[cmd][flag]
    required = [] if (cmd, flag) == ("run", "--config") else REQUIRED[cmd]
    argv = [cmd, *_fill(required, paths), *_fill(args, paths), "--print-config"]
    tree = _printed(argv, capsys)
    if key == SELF:  # the printed settings are the defaults + required, and nothing was written
        assert not (Path(paths["root"]) / "c").exists() and not (Path(paths["root"]) / "run1").exists()
        return
    if key == ACTION:  # a run switch does not change the settings; its real run is the named test
        assert tree == _printed([cmd, *_fill(required, paths), "--print-config"], capsys)
        assert want in globals()
        return
    assert _dig(tree, key) == _fill(want, paths), f"slimtune {cmd} {flag}: {key} = {_dig(tree, key)!r}"


def test_run_overrides_reach_the_printed_recipe(paths: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Positional ``key.path=value`` overrides, with RECIPE and with ``--config`` (the recipe slot)."""
    tree = _printed(["run", paths["recipe"], "evaluate.batch_size=5", "report.title=x", "--print-config"], capsys)
    assert (tree["evaluate"]["batch_size"], tree["report"]["title"], tree["stages"]) == (5, "x", ["evaluate", "report"])
    tree = _printed(["run", "--config", paths["recipe"], "evaluate.batch_size=5", "--print-config"], capsys)
    assert tree["evaluate"]["batch_size"] == 5
    assert main(["run", paths["recipe"], "--config", paths["recipe2"]]) == 2
    assert "give the recipe once" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "{bert}", "--repeats", "0"], "slimtune bench: error: --repeats: must be >= 1, got 0"),
    (["bench", "--model", "{bert}", "--seq-lens", "16,0"], "--seq-lens: must be >= 1, got 0"),
    (["bench", "--model", "{bert}", "--batch-sizes", "x"], "--batch-sizes[0]: expected an integer, got 'x'"),
    (["bench", "--print-config"], "--model: is required"),
    (["compress", *REQUIRED["compress"], "--quant", "int9"], "--quant[0]: 'int9' is not one of ['int8', 'int4', 'none']"),
    (["compress", *REQUIRED["compress"], "--ffn", "1"], "--ffn: must be in (0, 1), got 1.0"),
    (["compress", *REQUIRED["compress"], "--max-accuracy-drop", "-1"], "--max-accuracy-drop: must be >= 0"),
    (["compress", *REQUIRED["compress"], "--train", "{root}/missing.tsv"], "--train: file not found"),
    # used to pass validation and crash in the final bench, after the whole search (statistics of 0 rounds)
    (["compress", *REQUIRED["compress"], "--bench-repeats", "0"], "--bench-repeats: must be >= 1, got 0"),
    (["serve", "--model", "{bert}", "--port", "70000"], "--port: must be in [0, 65535], got 70000"),
    (["evaluate", "--model", "{bert}"], "--eval: is required"),
    (["evaluate", "--model", "{bert}", "--eval", "{eval}", "--max-length", "0"], "--max-length: must be >= 1, got 0"),
    (["run", "{recipe}", "evaluate.model=x"], "evaluate.model: set by the pipeline itself"),
    (["run", "{recipe}", "evaluate.batch_size=0"], "evaluate.batch_size: must be >= 1, got 0"),
])
def test_bad_values_exit_2_in_one_line_before_anything(argv: list[str], message: str, paths: dict[str, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(_fill(argv, paths)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (Path(paths["root"]) / "c").exists() and not (Path(paths["root"]) / "run1").exists()


# --------------------------------------------------------------------------------------------
# Flags that change numbers or gates: real runs on tiny fixtures
# --------------------------------------------------------------------------------------------


def test_bench_flags_change_the_measurement(paths: dict[str, str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"  # no suffix: still a file, its settings go beside it
    assert main(["bench", "--model", paths["bert"], paths["bert2"], "--batch-sizes", "1,2", "--seq-lens", "8,16",
                 "--threads", "2", "--repeats", "3", "--warmup", "1", "--min-seconds", "0.2",
                 "--eval", paths["eval"], "--max-eval-samples", "5", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["models"]) == [Path(paths["bert"]).name, Path(paths["bert2"]).name]
    for row in res["models"].values():
        grid = [(e["threads"], e["batch_size"], e["seq_len"]) for e in row["latency"]]
        assert grid == [(2, 1, 8), (2, 1, 16), (2, 2, 8), (2, 2, 16)]
        assert all(e["n"] >= 3 for e in row["latency"]) and row["n"] == 5  # --repeats, --max-eval-samples
    for i in range(4):  # --min-seconds 0.2: each setting's interleaved rounds went on for >= 0.2 s in all
        assert sum(r["latency"][i]["n"] * r["latency"][i]["mean_ms"] for r in res["models"].values()) >= 0.95 * 200
    assert res["settings"]["warmup"] == 1 and res["settings"]["repeats"] == 3
    saved = tmp_path / "result.bench.yaml"
    assert yaml.safe_load(saved.read_text())["seq_lens"] == [8, 16]
    # --repeats without --min-seconds: exactly that many rounds
    assert main(["bench", "--config", str(saved), "--min-seconds", "0", "--output", str(tmp_path / "b2.json"),
                 "--eval", paths["eval"]]) == 0
    again = json.loads((tmp_path / "b2.json").read_text())
    assert {e["n"] for r in again["models"].values() for e in r["latency"]} == {3}
    capsys.readouterr()


def test_evaluate_flags_change_the_numbers(paths: dict[str, str], tmp_path: Path, tiny_llama_dir: Path,
                                           tiny_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def evaluate(name: str, *extra: str) -> dict[str, Any]:
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", paths["bert"], "--eval", paths["eval"], "--output", str(out), *extra]) == 0
        return json.loads(out.read_text())

    full, short = evaluate("full"), evaluate("short", "--max-length", "4")
    assert full["n"] == 24 and short["n"] == 24
    assert full["loss"] != pytest.approx(short["loss"], abs=1e-6)  # truncation changed the logits
    some = evaluate("some", "--max-eval-samples", "5", "--batch-size", "2")
    assert some["n"] == 5
    # causal-LM text: --max-eval-samples keeps the first N blocks of --max-length tokens
    lm = ["evaluate", "--model", str(tiny_llama_dir), "--eval", str(tiny_corpus), "--max-length", "16"]
    assert main([*lm, "--output", str(tmp_path / "lm.json")]) == 0
    assert main([*lm, "--output", str(tmp_path / "lm2.json"), "--max-eval-samples", "2"]) == 0
    full_lm, two = (json.loads((tmp_path / f).read_text()) for f in ("lm.json", "lm2.json"))
    assert two["tokens"] == 2 * 15 < full_lm["tokens"]  # 15 predicted tokens per 16-token block
    # the settings beside the metrics read back as --config
    saved = tmp_path / "some.json.evaluate.yaml"
    assert yaml.safe_load(saved.read_text())["max_eval_samples"] == 5
    capsys.readouterr()
    assert main(["evaluate", "--config", str(saved), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(saved.read_text())


def test_compress_gates_follow_the_flags(paths: dict[str, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--max-accuracy-drop sets the accuracy floor; --prefer picks among the feasible; --max-size-mb can fail all."""
    out = tmp_path / "c"
    base = ["compress", "--model", paths["bert"], "--train", paths["train"], "--eval", paths["eval"],
            "--output", str(out), "--depths", "1", "--ffn", "0.5", "--quant", "none", "--no-vocab",
            "--max-train-samples", "32", "--max-length", "16", "--batch-size", "16", "--recover-steps", "1",
            "--bench-seq-len", "8", "--bench-repeats", "2", "--budget-minutes", "10"]

    def summary() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return json.loads((out / "summary.json").read_text()), json.loads((out / "candidates.json").read_text())

    assert main([*base, "--max-accuracy-drop", "100", "--prefer", "size"]) == 0
    s, cands = summary()
    acc = next(c for c in cands if c["name"] == "input")["accuracy"]
    assert s["min_accuracy"] == pytest.approx(acc - 1.0)
    ok = [c for c in cands if c["status"] == "ok"]
    assert {c["name"] for c in ok} == {"input", "S32", "L1", "L1-ffn50"} and all(c["meets_constraints"] for c in ok)
    assert s["best"] == min(ok, key=lambda c: c["size_mb"])["name"]  # --prefer size
    saved = yaml.safe_load((out / "compress.yaml").read_text())
    assert saved["prefer"] == "size" and saved["quant"] == ["none"]
    assert _printed(["compress", "--config", str(out / "compress.yaml"), "--print-config"], capsys) == saved

    assert main([*base, "--max-accuracy-drop", "0"]) == 0  # the input itself always meets a zero drop
    s, cands = summary()
    assert s["min_accuracy"] == pytest.approx(acc)
    for c in cands:
        assert c["meets_constraints"] == (c["status"] == "ok" and c["accuracy"] >= acc - 1e-12), c["name"]

    assert main([*base, "--max-accuracy-drop", "100", "--max-size-mb", "0.0001"]) == 1  # nothing is that small
    s, cands = summary()
    assert not s["meets_constraints"] and not any(c["meets_constraints"] for c in cands)
    capsys.readouterr()


def test_serve_flags_gate_requests(paths: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from slimtune.cli.common import resolve_settings
    from slimtune.serve.app import create_app, load_runner
    from slimtune.serve.settings import ServeConfig

    args = build_parser(["serve"]).parse_args(["serve", "--model", paths["bert"], "--max-texts", "2", "--max-chars", "12",
                                      "--api-key", "k", "--max-body-bytes", "400"])
    cfg = resolve_settings(ServeConfig, args, "serve")
    key = {"x-api-key": "k"}
    with TestClient(create_app(load_runner(cfg.model), cfg)) as c:
        assert c.post("/v1/classify", json={"texts": ["good"]}).status_code == 401  # --api-key
        assert c.post("/v1/classify", json={"texts": ["good", "bad"]}, headers=key).status_code == 200
        assert c.post("/v1/classify", json={"texts": ["good"] * 3}, headers=key).status_code == 422  # --max-texts
        assert c.post("/v1/classify", json={"texts": ["good movie plot"]}, headers=key).status_code == 422  # --max-chars
        assert c.post("/v1/classify", json={"texts": ["a" * 500]}, headers=key).status_code == 413  # --max-body-bytes


def test_run_force_reruns_and_dry_run_writes_nothing(paths: dict[str, str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(paths, str(tmp_path / "out"))))
    out = tmp_path / "out"
    assert main(["run", "--dry-run", str(recipe)]) == 0
    assert "01-evaluate" in capsys.readouterr().out and not out.exists()  # --dry-run: validated, nothing written

    def ran() -> dict[str, bool]:
        lines = capsys.readouterr().out.splitlines()
        return {ln.split()[0]: "ran in" in ln for ln in lines if ln.split() and ln.split()[0] in ("evaluate", "report")}

    assert main(["run", str(recipe)]) == 0
    assert ran() == {"evaluate": True, "report": True}
    ev = json.loads((out / "01-evaluate" / "evaluation.json").read_text())
    assert ev["models"]["input"]["n"] == 12  # evaluate.max_eval_samples of the recipe
    assert main(["run", str(recipe)]) == 0
    assert ran() == {"evaluate": False, "report": False}  # unchanged: skipped
    assert main(["run", "--force", str(recipe)]) == 0
    assert ran() == {"evaluate": True, "report": True}  # --force: rerun anyway
    # OUT/run.yaml is the resolved recipe; --config reads it back to the same plan
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert saved == yaml.safe_load((out / "pipeline.yaml").read_text())
    assert _printed(["run", "--config", str(out / "run.yaml"), "--print-config"], capsys) == saved
