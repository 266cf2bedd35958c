"""``slimtune compress`` on a tiny BERT: output contract, every candidate kept, honest miss; ``slimtune bench``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune.config.recipe import RecipeError
from slimtune.pipeline.search import CompressSettings, predict_size_mb, run_compress


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_assets) -> dict[str, Path]:
    """A tiny BERT teacher with labels neg/pos and sentiment files labelled by those names."""
    names = ("neg", "pos")
    return {"root": tmp_path_factory.mktemp("compress"),
            "teacher": tiny_assets.bert(layers=2, hidden=32, id2label={0: "neg", 1: "pos"}),
            "train": tiny_assets.tsv(96, names=names), "eval": tiny_assets.tsv(40, 1, names=names),
            "test": tiny_assets.tsv(40, 2, names=names)}


def _settings(setup: dict[str, Path], out: str, **kw: object) -> CompressSettings:
    base = dict(model=str(setup["teacher"]), train=str(setup["train"]), eval=str(setup["eval"]),
                test=str(setup["test"]), output=str(setup["root"] / out), max_accuracy_drop=100.0,
                budget_minutes=10, depths=[1], ffn=[0.5], max_train_samples=64, max_length=32, batch_size=16,
                recover_steps=2, bench_seq_len=16, bench_repeats=5)
    base.update(kw)
    return CompressSettings(**base)  # type: ignore[arg-type]


def test_predict_size_matches_real_files(setup: dict[str, Path]) -> None:
    from slimtune.io import weights_size_mb

    cfg = json.loads((setup["teacher"] / "config.json").read_text())
    pred = predict_size_mb(cfg, layers=2)
    assert pred == pytest.approx(weights_size_mb(setup["teacher"]), rel=0.05)
    assert predict_size_mb(cfg, layers=1, int8=True) < predict_size_mb(cfg, layers=2, int8=True) < pred


def test_validation_names_the_flag(setup: dict[str, Path]) -> None:
    with pytest.raises(RecipeError, match="--max-accuracy-drop"):
        _settings(setup, "x", max_accuracy_drop=-1).validate()
    with pytest.raises(RecipeError, match="--train: file not found"):
        _settings(setup, "x", train="nope.tsv").validate()
    with pytest.raises(RecipeError, match="--ffn"):
        _settings(setup, "x", ffn=[1.5]).validate()
    with pytest.raises(RecipeError, match="--model"):
        _settings(setup, "x", model=str(setup["root"])).validate()


def test_compress_contract_then_honest_miss(setup: dict[str, Path]) -> None:
    from slimtune.cli.main import main

    s = _settings(setup, "out")
    summary = run_compress(s, log=lambda m: None)
    out = Path(s.output)
    assert summary["meets_constraints"]
    cands = json.loads((out / "candidates.json").read_text())
    names = {c["name"] for c in cands}
    assert {"input", "v", "v-int8", "L1", "L1-int8", "L1-ffn50", "L1-ffn50-int8"} <= names
    for c in cands:
        assert c["status"] == "ok", c
        assert Path(c["path"]).is_dir()
        for k in ("settings", "size_mb", "latency_ms_p50", "accuracy", "test_accuracy", "on_pareto_front"):
            assert k in c, (c["name"], k)
        if c["name"] != "input":
            assert (Path(c["path"]) / "candidate.json").is_file()  # kept on disk with its settings
    assert any(c["on_pareto_front"] for c in cands)
    best = next(c for c in cands if c["best"])
    # balanced choice: no feasible candidate is both smaller and faster than the chosen one
    assert not any(c["size_mb"] < best["size_mb"] and c["latency_ms_p50"] < best["latency_ms_p50"] for c in cands)
    m = json.loads((out / "best" / "metrics.json").read_text())
    assert {"accuracy", "size_mb", "latency_ms_p50"} <= set(m) and m["meets_constraints"] is True
    assert m["candidate"] == best["name"]
    # OUT/compress.yaml holds the resolved settings; --config reads it back unchanged
    import yaml

    from slimtune.config.fields import settings_dict

    saved = yaml.safe_load((out / "compress.yaml").read_text())
    assert saved == settings_dict(s.resolved())  # the task's defaults filled in
    assert (saved["quant"], saved["recover_steps"], saved["batch_size"]) == (["int8"], 2, 16)
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert f"{best['test_accuracy']:.4f} vs" in summary["verdict"]  # the held-out figure is in the verdict
    assert "test retention" in (out / "report.md").read_text()
    # best/ works with evaluate, bench and serve's loader
    assert main(["evaluate", "--model", str(out / "best"), "--eval", str(setup["test"]),
                 "--output", str(out / "ev.json"), "--max-length", "32"]) == 0
    assert json.loads((out / "ev.json").read_text())["accuracy"] == pytest.approx(best["test_accuracy"])
    from slimtune.runtime.classifier import load_classifier

    assert load_classifier(out / "best")([[2, 5, 6, 3]]).shape == (1, 2)

    # Same output, impossible constraint: candidates are reused (not rebuilt), the miss is said
    # clearly, exit code 1, best/ still holds the closest candidate, everything is kept.
    args = ["compress", "--model", s.model, "--train", s.train, "--eval", s.eval, "--test", s.test,
            "--output", s.output, "--max-accuracy-drop", "0", "--max-size-mb", "0.0001",
            "--depths", "1", "--ffn", "0.5", "--max-train-samples", "64", "--max-length", "32",
            "--batch-size", "16", "--recover-steps", "2", "--bench-seq-len", "16", "--bench-repeats", "5"]
    mtime = (out / "candidates" / "L1" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 1
    assert (out / "candidates" / "L1" / "model.safetensors").stat().st_mtime_ns == mtime  # reused
    m = json.loads((out / "best" / "metrics.json").read_text())
    assert m["meets_constraints"] is False
    cands = json.loads((out / "candidates.json").read_text())
    assert all(not c["meets_constraints"] for c in cands) and len(cands) >= 7
    assert "NO candidate meets" in json.loads((out / "summary.json").read_text())["verdict"]


def test_bench_cli_hf_and_onnx(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimtune.cli.main import main
    from slimtune.compress.quant.recipe import QuantizeSettings, run_quantize

    onnx_dir = tmp_path / "int8"
    run_quantize(QuantizeSettings(model=str(setup["teacher"]), output=str(onnx_dir), scheme="int8",
                                  backend="onnxruntime", seq_len=16, repeats=2, min_sqnr_db=-100))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(setup["teacher"]), str(onnx_dir), "--batch-sizes", "1,2",
                 "--seq-lens", "16", "--repeats", "3", "--eval", str(setup["eval"]), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = list(res["models"].values())
    assert [r["kind"] for r in rows] == ["hf", "onnx"]
    for r in rows:
        assert r["params"] > 0 and r["size_mb"] > 0 and 0 <= r["accuracy"] <= 1
        assert [(e["batch_size"], e["seq_len"]) for e in r["latency"]] == [(1, 16), (2, 16)]
        assert all(e["p50_ms"] > 0 and e["throughput_per_s"] > 0 for e in r["latency"])
    assert res["hardware"]["cores"] >= 1 and "torch" in res["hardware"]
    assert "x faster" in capsys.readouterr().out
    # the settings are written beside the JSON, and --config reads them back
    import yaml

    saved = tmp_path / "bench.json.bench.yaml"
    assert yaml.safe_load(saved.read_text())["batch_sizes"] == [1, 2]
    assert main(["bench", "--config", str(saved), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(saved.read_text())
    assert main(["bench", "--model", str(tmp_path / "missing")]) == 2  # one clear line, no traceback
    assert "--model: not a model folder" in capsys.readouterr().err
    assert main(["bench", "--model", str(setup["teacher"]), "--repeats", "0"]) == 2  # a range, not a traceback
    assert capsys.readouterr().err.strip() == "slimtune bench: error: --repeats: must be >= 1, got 0"
