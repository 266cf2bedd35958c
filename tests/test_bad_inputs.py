"""The README's promise for every command (issue #20): a bad input is ONE line on stderr naming the
file and line, or the key / flag, exit 2, no traceback, and nothing already written is lost or
half-written.

One table, commands x bad inputs. Every row runs ``slimtune`` in-process and checks:

- exit status 2, exactly one ``slimtune <command>: error:`` line on stderr, no traceback, and
  the line names what is wrong (each row lists the words it must contain);
- ``FINISHED``, a finished fine-tune folder that rows write into or next to, is byte-identical
  afterwards, and a new output folder a row names is not created.

``serve`` and ``compress`` would serve / search if a row were accepted: their entry points are
replaced by a failure for the duration of the test, so a missed refusal fails instead of hanging.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import slimtune.cli.compress
import slimtune.cli.serve
from slimtune.cli.main import main

NEW = "{root}/new-out"  # a folder no row may create

# command -> the arguments of a run that would work (each row changes one thing)
BASE: dict[str, list[str]] = {
    "finetune": ["--model", "{bert}", "--train", "{train}", "--output", NEW, "--max-steps", "1", "--no-progress"],
    "distill": ["--teacher", "{bert}", "--train", "{train}", "--student-layers", "1", "--output", NEW,
                "--max-steps", "1", "--no-progress"],
    "validate": ["{recipe}"],
    "run": ["{pipeline}"],
    "evaluate": ["--model", "{bert}", "--eval", "{eval}"],
    "prune": ["--model", "{bert}", "--output", NEW, "--sparsity", "0.5"],
    "quantize": ["--model", "{bert}", "--output", NEW, "--seq-len", "16", "--repeats", "2"],
    "bench": ["--model", "{bert}", "--seq-lens", "8", "--repeats", "2"],
    "serve": ["--model", "{bert}"],
    "compress": ["--model", "{bert}", "--train", "{train}", "--eval", "{eval}", "--output", NEW,
                 "--max-accuracy-drop", "1"],
    "augment": ["--model", "{bert}", "--input", "{train}", "--output", "{root}/aug.tsv"],
    "generate": ["--model", "{llama}", "--prompt", "the"],
    "export": ["--model", "{llama}", "--format", "safetensors", "--output", NEW],
}


def _set(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value replaced (or the flag added)."""
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
        return out
    return [*out, flag, value]


# (command, case, argv after the command, words the error line must contain)
ROWS: list[tuple[str, str, list[str], list[str]]] = []


def _row(cmd: str, case: str, argv: list[str], *words: str) -> None:
    ROWS.append((cmd, case, argv, list(words)))


for _cmd, _flag in (("finetune", "--train"), ("distill", "--train"), ("evaluate", "--eval"), ("compress", "--train"),
                    ("augment", "--input"), ("quantize", "--eval"), ("bench", "--eval")):
    _row(_cmd, "missing data file", _set(BASE[_cmd], _flag, "{root}/missing.tsv"), "missing.tsv")
for _cmd, _flag in (("finetune", "--train"), ("distill", "--train"), ("evaluate", "--eval"), ("augment", "--input")):
    _row(_cmd, "malformed row", _set(BASE[_cmd], _flag, "{bad}"), "bad.tsv:3")
_row("validate", "missing data file", ["{recipe_missing}"], "missing.tsv")
_row("validate", "malformed row", ["{recipe_bad_rows}"], "bad.tsv:3")
_row("run", "missing data file", ["{pipeline}", "data.train={root}/missing.tsv"], "missing.tsv")
for _cmd in BASE:
    if _cmd not in ("validate", "run", "generate"):
        _row(_cmd, "duplicate key", [*BASE[_cmd], "--config", "{dup_yaml}"], "dup.yaml:2", "line 1")
_row("validate", "duplicate key", ["{dup_recipe}"], "dup-recipe.yaml:4", "line 3")
_row("run", "duplicate key", ["{dup_pipeline}"], "dup-pipeline.yaml:", "duplicate key")
for _cmd in ("finetune", "distill"):
    _row(_cmd, "non-finite number", [*BASE[_cmd], "--config", "{nan_recipe}"], "train.lr", "finite")
    _row(_cmd, "unknown key", [*BASE[_cmd], "--config", "{unknown_recipe}"], "train.lr_typo")
_row("validate", "non-finite number", ["{nan_recipe}"], "train.lr", "finite")
_row("run", "non-finite number", ["{pipeline}", "train.lr=.nan"], "train.lr", "finite")
for _cmd, key, flag in (("prune", "lr", "--lr"), ("quantize", "min_sqnr_db", "--min-sqnr"),
                        ("serve", "max_wait_ms", "--max-wait-ms"), ("compress", "budget_minutes", "--budget-minutes"),
                        ("bench", "min_seconds", "--min-seconds")):
    _row(_cmd, "non-finite number", [*BASE[_cmd], "--config", f"{{nan_{key}}}"], flag, "finite")
    _row(_cmd, "unknown key", [*BASE[_cmd], "--config", "{unknown_flat}"], "bogus")
for _cmd, key, value in (("finetune", "train.batch_size", "0"), ("distill", "train.weight_decay", "-1")):
    _row(_cmd, f"out of range {key}", _set(BASE[_cmd], "--" + key.split(".")[1].replace("_", "-"), value), key)
for _cmd, flag, value in (("prune", "--sparsity", "1.5"),
                          ("quantize", "--repeats", "0"), ("serve", "--max-queue", "0"), ("bench", "--repeats", "0"),
                          ("evaluate", "--batch-size", "0"), ("compress", "--budget-minutes", "-1"),
                          ("augment", "--copies", "0"), ("generate", "--max-new-tokens", "0"), ("serve", "--max-connections", "0"),
                          ("serve", "--header-timeout-s", "0")):
    _row(_cmd, f"out of range {flag}", _set(BASE[_cmd], flag, value), flag)
_row("run", "out of range key", ["{pipeline}", "train.batch_size=0"], "train.batch_size")
for _cmd in ("finetune", "distill", "evaluate", "prune", "quantize", "bench", "serve", "compress", "augment", "generate",
             "export"):
    flag = "--teacher" if _cmd == "distill" else "--model"
    _row(_cmd, "missing model", _set(BASE[_cmd], flag, "{root}/nonexistent"), "nonexistent")
for _cmd in ("finetune", "distill", "evaluate", "prune", "quantize", "bench", "serve", "generate", "export"):
    flag = "--teacher" if _cmd == "distill" else "--model"
    _row(_cmd, "pickle-only model", _set(BASE[_cmd], flag, "{llama_pickled}" if _cmd in ("generate", "export") else "{pickled}"),
         "pytorch_model.bin", "--allow-pickle")
_row("export", "unknown key", [*BASE["export"], "--config", "{unknown_flat}"], "bogus")
_row("export", "out of range --check-tokens", _set(BASE["export"], "--check-tokens", "0"), "--check-tokens")
_row("export", "a format that cannot hold the model", _set(_set(BASE["export"], "--model", "{bert}"), "--format", "gguf"),
     "a sequence classifier", "GGUF holds decoders")
for _cmd in ("finetune", "distill", "prune", "quantize", "export"):
    _row(_cmd, "finished output", _set(BASE[_cmd], "--output", "{finished}"), "finished", "--overwrite")
    _row(_cmd, "foreign output", _set(BASE[_cmd], "--output", "{foreign}"), "slimtune did not write")
_row("validate", "finished output", ["{recipe_finished}"], "finished", "--overwrite")


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory, tiny_assets) -> dict[str, str]:  # noqa: ANN001
    """Every file a row names, and FINISHED: a real finished fine-tune folder."""
    root = tmp_path_factory.mktemp("bad-inputs")
    bert, llama = tiny_assets.bert(), tiny_assets.llama()
    train, ev = tiny_assets.tsv(32, seed=1), tiny_assets.tsv(16, seed=2)
    bad = root / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nno label here\nbad film\t0\n")
    p = {"root": str(root), "bert": str(bert), "llama": str(llama), "train": str(train), "eval": str(ev), "bad": str(bad)}
    for name, src in (("pickled", bert), ("llama_pickled", llama)):
        d = root / name
        shutil.copytree(src, d)
        torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
        p[name] = str(d)
    finished = root / "finished"
    assert main(["finetune", "--model", str(bert), "--train", str(train), "--output", str(finished), "--max-steps", "2",
                 "--no-progress", "--no-tensorboard"]) == 0
    p["finished"] = str(finished)
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's work")
    p["foreign"] = str(foreign)
    recipe = {"output": str(root / "new-out"), "model": {"name": str(bert)}, "data": {"train": str(train)}}

    def dump(name: str, tree: dict) -> str:
        (root / name).write_text(yaml.safe_dump(tree, sort_keys=False))
        return str(root / name)

    p["recipe"] = dump("recipe.yaml", recipe)
    p["recipe_missing"] = dump("recipe-missing.yaml", {**recipe, "data": {"train": str(root / "missing.tsv")}})
    p["recipe_bad_rows"] = dump("recipe-bad.yaml", {**recipe, "data": {"train": str(bad)}})
    p["recipe_finished"] = dump("recipe-finished.yaml", {**recipe, "output": str(finished)})
    p["nan_recipe"] = str(root / "nan.yaml")
    (root / "nan.yaml").write_text("train:\n  lr: .nan\n")
    p["unknown_recipe"] = dump("unknown.yaml", {"train": {"lr_typo": 0.1}})
    p["unknown_flat"] = dump("unknown-flat.yaml", {"bogus": 1})
    for key in ("lr", "min_sqnr_db", "max_wait_ms", "budget_minutes", "min_seconds"):
        (root / f"nan-{key}.yaml").write_text(f"{key}: .nan\n")
        p[f"nan_{key}"] = str(root / f"nan-{key}.yaml")
    (root / "dup.yaml").write_text("seed: 1\nseed: 2\n")
    p["dup_yaml"] = str(root / "dup.yaml")
    (root / "dup-recipe.yaml").write_text(f"output: {root / 'new-out'}\nmodel:\n  name: {bert}\n  name: {bert}\n")
    p["dup_recipe"] = str(root / "dup-recipe.yaml")
    pipeline = {**recipe, "output": str(root / "new-out"), "finetune": {"train": {"max_steps": 1}}}
    p["pipeline"] = dump("pipeline.yaml", pipeline)
    (root / "dup-pipeline.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False) + "finetune: {}\n")
    p["dup_pipeline"] = str(root / "dup-pipeline.yaml")
    return p


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture()
def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row that is wrongly accepted fails here instead of serving or searching for minutes."""
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the bad input was accepted: the command started for real")

    monkeypatch.setattr(slimtune.cli.serve, "run_server", refuse)
    monkeypatch.setattr(slimtune.cli.compress, "run_compress", refuse)


@pytest.mark.parametrize("cmd, case, argv, words", ROWS, ids=[f"{c}: {k}" for c, k, _, _ in ROWS])
def test_bad_input_is_one_line_exit_2_and_nothing_is_lost(cmd: str, case: str, argv: list[str], words: list[str],
                                                          paths: dict[str, str], no_serving: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    finished = Path(paths["finished"])
    before, foreign_before = _snapshot(finished), _snapshot(Path(paths["foreign"]))
    filled = [a.format(**paths) for a in argv]
    capsys.readouterr()
    rc = main([cmd, *filled])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("slimtune")]
    assert rc == 2, f"exit {rc}; stderr: {err[-1500:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"slimtune {cmd}: error: "), lines
    for w in words:
        assert w.format(**paths) in lines[0], (w, lines[0])
    assert _snapshot(finished) == before, "the finished run was changed"
    assert _snapshot(Path(paths["foreign"])) == foreign_before
    assert not Path(NEW.format(**paths)).exists(), "a failed run created its output folder"
    assert not Path(paths["root"], "aug.tsv").exists()


def test_the_table_covers_every_command() -> None:
    from slimtune.cli.main import COMMANDS

    covered = {c for c, *_ in ROWS}
    assert covered == set(COMMANDS), set(COMMANDS) - covered
    assert len(ROWS) >= 80
