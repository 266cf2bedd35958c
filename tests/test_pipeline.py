"""``slimtune run``: strict whole-recipe validation, the full chain on a tiny BERT, skip/resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune.config.recipe import RecipeError
from slimtune.pipeline.run import fingerprint, run_pipeline, stage_key, validate_tree


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_assets, tiny_bert_dir: Path) -> dict[str, Path]:
    return {"root": tmp_path_factory.mktemp("pipe"), "model": tiny_bert_dir,  # 2 layers, hidden 32
            "train": tiny_assets.tsv(64), "eval": tiny_assets.tsv(24, 1), "test": tiny_assets.tsv(24, 2)}


def _tree(files: dict[str, Path], out: str = "out") -> dict:
    return {
        "output": str(files["root"] / out),
        "model": {"name": str(files["model"])},
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "max_length": 16},
        "train": {"max_steps": 3, "batch_size": 16, "lr": 1e-3, "tensorboard": False, "log_every": 1},
        "finetune": {},
        "distill": {"student_layers": 1, "train": {"max_steps": 2}},
        "prune": {"vocab": True, "ffn": 0.5, "recover_steps": 1, "kd": True, "batch_size": 16},
        "quantize": {"scheme": "int8", "backend": "onnxruntime", "min_sqnr_db": -1000, "max_accuracy_drop": 100,
                     "repeats": 2, "seq_len": 16},
        "evaluate": {"eval": str(files["test"])},
        "bench": {"seq_lens": [16], "repeats": 3, "warmup": 1},
        "report": {"title": "tiny chain"},
    }


def test_slimtune_validate_accepts_a_pipeline_recipe(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """`slimtune validate` checks `slimtune run` recipes too, with the same key-naming errors."""
    import yaml

    from slimtune.cli.main import main

    good, bad = files["root"] / "pipe.yaml", files["root"] / "bad.yaml"
    good.write_text(yaml.safe_dump(_tree(files)))
    tree = _tree(files)
    tree["prune"]["ffnn"] = 0.5
    bad.write_text(yaml.safe_dump(tree))
    assert main(["validate", str(good)]) == 0
    assert "pipeline: finetune -> distill -> prune" in capsys.readouterr().out
    assert main(["validate", str(bad)]) == 2
    assert "unknown key 'prune.ffnn'" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["prune"].update(ffnn=0.5), "unknown key 'prune.ffnn'"),
    (lambda t: t["distill"].update(student_layerz=2), "unknown key 'distill.student_layerz'"),
    (lambda t: t["bench"].update(batch_sizes=[0]), "bench.batch_sizes"),
    (lambda t: t["quantize"].update(scheme="int3"), "quantize.scheme"),
    (lambda t: t["train"].update(lr=-1), "train.lr"),
    (lambda t: t.update(stages=["prune", "finetune"]), "must follow the order"),
    (lambda t: t.update(stages=["finetune", "compile"]), "unknown stage 'compile'"),
    (lambda t: t.update(stages=["finetune"]), "distill: section given but"),
    (lambda t: t.update(extra={}), "unknown section 'extra'"),
    (lambda t: t.pop("output"), "'output'"),
    (lambda t: t["evaluate"].update(eval="missing.tsv"), "evaluate.eval: file not found"),
    (lambda t: t["prune"].update(ffn=0, vocab=False), "nothing to prune"),
    # the evaluate/bench sections are the commands' settings: their ranges, and no pipeline-filled keys
    (lambda t: t["bench"].update(repeats=0), r"bench.repeats: must be >= 1, got 0"),  # crashed in the bench stage
    (lambda t: t["bench"].update(seq_lens=[]), "bench.seq_lens: give at least one value"),
    (lambda t: t["bench"].update(model=["x"]), "bench.model: set by the pipeline itself"),
    (lambda t: t["evaluate"].update(batch_size=0), "evaluate.batch_size: must be >= 1"),
    (lambda t: t["evaluate"].update(output="m.json"), "evaluate.output: set by the pipeline itself"),
    (lambda t: t["report"].update(reference="teacher"), "report.reference"),
])
def test_whole_recipe_validated_before_any_weight(files: dict[str, Path], edit, message: str) -> None:
    tree = _tree(files)
    edit(tree)
    with pytest.raises(RecipeError, match=message):
        validate_tree(tree, "r.yaml")


def test_default_stage_list_is_the_sections_in_order(files: dict[str, Path]) -> None:
    tree = _tree(files)
    for s in ("finetune", "distill", "bench", "report"):
        tree.pop(s)
    plan = validate_tree(tree)
    assert plan.stages == ["prune", "quantize", "evaluate"]
    assert plan.stage_dir("quantize").name == "02-quantize"


def test_stage_key_changes_with_config_and_inputs(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 10)
    (d / "checkpoint.pt").write_bytes(b"ignored")
    k = stage_key("prune", {"ffn": 0.5}, [str(d)])
    assert k == stage_key("prune", {"ffn": 0.5}, [str(d)])
    assert k != stage_key("prune", {"ffn": 0.25}, [str(d)])
    (d / "model.safetensors").write_bytes(b"y" * 11)
    assert k != stage_key("prune", {"ffn": 0.5}, [str(d)])
    assert [f[0] for f in fingerprint([str(d)])[0][1]] == ["model.safetensors"]


def test_full_chain_then_skip_then_resume(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import slimtune.pipeline.run

    plan = validate_tree(_tree(files))
    out = plan.output
    # 1. the quantize stage fails: earlier stages are done and kept, the run stops there
    real = slimtune.pipeline.run.run_quantize

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(slimtune.pipeline.run, "run_quantize", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(plan, log=lambda m: None)
    for s in ("01-finetune", "02-distill", "03-prune"):
        assert json.loads((out / s / "stage.json").read_text())["status"] == "done"
    assert json.loads((out / "04-quantize" / "stage.json").read_text())["status"] == "running"
    monkeypatch.setattr(slimtune.pipeline.run, "run_quantize", real)
    # 2. rerun: resumes at quantize, finishes the chain
    result = run_pipeline(plan, log=lambda m: None)
    ran = {s["stage"]: s["skipped"] for s in result["stages"]}
    assert ran == {"finetune": True, "distill": True, "prune": True, "quantize": False,
                   "evaluate": False, "bench": False, "report": False}
    names = [r["name"] for r in result["rows"]]
    assert names == ["01-finetune", "02-distill", "03-prune", "04-quantize"]
    assert (out / "04-quantize" / "model.onnx").is_file()
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["02-distill"]["params"] < rows["01-finetune"]["params"]
    assert all(r["accuracy"] is not None and r["latency_ms_p50"] > 0 for r in rows.values())
    assert rows["01-finetune"]["retention"] == pytest.approx(1.0)
    for f in ("report.html", "report.md", "report.json"):
        assert (out / f).is_file() and (out / "07-report" / f).is_file()
    assert "tiny chain" in (out / "report.html").read_text()
    # 3. nothing changed: everything skipped, weights untouched
    mtime = (out / "02-distill" / "model.safetensors").stat().st_mtime_ns
    result = run_pipeline(plan, log=lambda m: None)
    assert all(s["skipped"] for s in result["stages"])
    assert (out / "02-distill" / "model.safetensors").stat().st_mtime_ns == mtime
    # 4. a prune setting changes: prune and everything after it rerun, earlier stages do not
    tree = _tree(files)
    tree["prune"]["ffn"] = 0.25
    result = run_pipeline(validate_tree(tree), log=lambda m: None)
    ran = {s["stage"]: s["skipped"] for s in result["stages"]}
    assert ran["finetune"] and ran["distill"] and not ran["prune"] and not ran["quantize"] and not ran["report"]
    assert json.loads((out / "03-prune" / "prune.json").read_text())["ffn"] == 0.25


def test_cli_dry_run_and_override_error(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from slimtune.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_tree(files, "dry")))
    assert main(["run", "--dry-run", str(recipe), "distill.student_layers=1"]) == 0
    assert "03-prune" in capsys.readouterr().out
    assert main(["run", str(recipe), "prune.bogus=1"]) == 2
    assert "prune.bogus" in capsys.readouterr().err
