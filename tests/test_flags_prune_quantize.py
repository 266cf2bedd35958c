"""The flag contract of ``slimtune prune`` and ``slimtune quantize``.

Every flag of both commands (enumerated from ``slimtune.cli.main.build_parser()``, so a new flag
without a row fails) has a row: a value, the resolved-settings key it must arrive at, and the
value printed there by ``--print-config`` (which loads no weights). Each row is also run without
the flag under test, and the key must differ: the flag is what changed it. Flags that change
numerics are then run for real on tiny models, and the artifacts must change accordingly.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers_chat import make_tiny_chat_llama, polarity_rows, write_jsonl
from safetensors.torch import load_file
from tiny import keyword_rows, make_prune_bert, make_quant_bert, random_label_rows, write_tsv

import slimtune.compress.prune.decoder_recipe
import slimtune.compress.prune.recipe
import slimtune.compress.quant.recipe
from slimtune.cli.main import build_parser, main
from slimtune.compress.prune.recipe import PruneSettings
from slimtune.compress.quant.recipe import QuantizeSettings
from slimtune.config.fields import settings_dict


@dataclass
class Row:
    """``argv`` (after ``pre``) must resolve ``key`` to ``value``; ``pre`` alone must not.

    With ``error``, the flag is refused: exit 2 and ``error`` in the message.
    """

    flag: str
    argv: list[str]
    key: str | None = None
    value: Any = None
    pre: list[str] = field(default_factory=list)
    error: str | None = None


# A causal-LM base for the rows of decoder-only flags (the later --model and --sparsity win).
DECODER = ["--model", "{dmodel}", "--sparsity", "0"]

PRUNE_ROWS = [
    Row("--config", ["--config", "{prune_recipe}"], "ffn", 0.5, pre=["--importance", "magnitude"]),
    Row("--config", ["--config", "{prune_flat}"], "scope", "layer"),
    Row("--model", ["--model", "{pmodel2}"], "model", "{pmodel2}"),
    Row("--output", ["--output", "{out2}"], "output", "{out2}"),
    Row("--overwrite", ["--overwrite"], "overwrite", True),
    Row("--no-overwrite", ["--no-overwrite"], "overwrite", False, pre=["--overwrite"]),
    Row("--train", ["--train", "{ptrain}"], "train", "{ptrain}"),
    Row("--eval", ["--eval", "{peval}"], "eval", "{peval}"),
    Row("--sparsity", ["--sparsity", "0.25"], "sparsity", 0.25),
    Row("--pattern", ["--pattern", "2:4"], "pattern", "2:4"),
    Row("--scope", ["--scope", "layer"], "scope", "layer"),
    Row("--schedule", ["--schedule", "oneshot"], "schedule", "oneshot"),
    Row("--heads", ["--heads", "0.5"], error="hidden_size // num_attention_heads"),
    Row("--ffn", ["--ffn", "0.5"], "ffn", 0.5, pre=["--importance", "magnitude"]),
    Row("--layers", ["--layers", "1"], "layers", 1, pre=["--train", "{ptrain}"]),
    Row("--keep-layers", ["--keep-layers", "1"], "keep_layers", 1.0, pre=["--train", "{ptrain}"]),
    Row("--importance", ["--importance", "magnitude"], "importance", "magnitude"),
    Row("--importance-batches", ["--importance-batches", "3"], "importance_batches", 3),
    Row("--vocab", ["--vocab"], "vocab", True, pre=["--train", "{ptrain}"]),
    Row("--no-vocab", ["--no-vocab"], "vocab", False, pre=["--train", "{ptrain}", "--vocab"]),
    Row("--vocab-from", ["--vocab-from", "{ptrain}", "{peval}"], "vocab_from", ["{ptrain}", "{peval}"]),
    Row("--vocab-min-count", ["--vocab-min-count", "3"], "vocab_min_count", 3),
    Row("--vocab-chars", ["--vocab-chars"], "vocab_keep_chars", True, pre=["--no-vocab-chars"]),
    Row("--no-vocab-chars", ["--no-vocab-chars"], "vocab_keep_chars", False),
    Row("--vocab-top", ["--vocab-top", "20"], "vocab_top", 20, pre=[*DECODER, "--vocab", "--train", "{dtrain}"]),
    Row("--recover-steps", ["--recover-steps", "5"], "recover_steps", 5, pre=["--train", "{ptrain}"]),
    Row("--kd", ["--kd"], "kd", True, pre=["--train", "{ptrain}", "--recover-steps", "2"]),
    Row("--no-kd", ["--no-kd"], "kd", False, pre=["--train", "{ptrain}", "--recover-steps", "2", "--kd"]),
    Row("--kd-temperature", ["--kd-temperature", "4"], "kd_temperature", 4.0),
    Row("--kd-alpha", ["--kd-alpha", "0.9"], "kd_alpha", 0.9),
    Row("--kd-positions", ["--kd-positions", "all"], "kd_positions", "all",
        pre=[*DECODER, "--keep-layers", "1", "--train", "{dtrain}", "--recover-steps", "2", "--kd"]),
    Row("--lr", ["--lr", "0.003"], "lr", 0.003),
    Row("--batch-size", ["--batch-size", "8"], "batch_size", 8),
    Row("--max-length", ["--max-length", "64"], "max_length", 64),
    Row("--max-train-samples", ["--max-train-samples", "10"], "max_train_samples", 10),
    Row("--max-eval-samples", ["--max-eval-samples", "7"], "max_eval_samples", 7),
    Row("--seed", ["--seed", "7"], "seed", 7),
    Row("--num-threads", ["--num-threads", "2"], "num_threads", 2),
    Row("--sparse-sidecar", ["--sparse-sidecar", "on"], "sparse_sidecar", "on"),
    Row("--print-config", []),  # every row uses it; its own row checks the whole printed tree
]

QUANT_ROWS = [
    Row("--config", ["--config", "{quant_recipe}"], "group_size", 16, pre=["--scheme", "int4"]),
    Row("--config", ["--config", "{quant_flat}"], "granularity", "tensor"),
    Row("--model", ["--model", "{qmodel2}"], "model", "{qmodel2}"),
    Row("--output", ["--output", "{out2}"], "output", "{out2}"),
    Row("--overwrite", ["--overwrite"], "overwrite", True),
    Row("--no-overwrite", ["--no-overwrite"], "overwrite", False, pre=["--overwrite"]),
    Row("--scheme", ["--scheme", "nf4"], "scheme", "nf4"),
    Row("--granularity", ["--granularity", "tensor"], "granularity", "tensor"),
    Row("--group-size", ["--group-size", "16"], "group_size", 16, pre=["--scheme", "int4"]),
    Row("--bits", ["--bits", "3"], "bits", 3, pre=["--scheme", "kmeans"]),
    Row("--symmetric", ["--symmetric"], "symmetric", True),
    Row("--no-symmetric", ["--no-symmetric"], "symmetric", False),
    Row("--asymmetric", ["--asymmetric"], "symmetric", False),
    Row("--embeddings", ["--embeddings"], "include_embeddings", True, pre=["--no-embeddings"]),
    Row("--no-embeddings", ["--no-embeddings"], "include_embeddings", False),
    Row("--backend", ["--backend", "onnxruntime"], "backend", "onnxruntime"),
    Row("--eval", ["--eval", "{qeval}"], "eval", "{qeval}"),
    Row("--max-eval-samples", ["--max-eval-samples", "5"], "max_eval_samples", 5),
    Row("--max-length", ["--max-length", "32"], "max_length", 32),
    Row("--threads", ["--threads", "2"], "threads", 2),
    Row("--batch-size", ["--batch-size", "4"], "batch_size", 4),
    Row("--seq-len", ["--seq-len", "16"], "seq_len", 16),
    Row("--repeats", ["--repeats", "3"], "repeats", 3),
    Row("--min-sqnr", ["--min-sqnr", "25"], "min_sqnr_db", 25.0),
    Row("--max-accuracy-drop", ["--max-accuracy-drop", "1.5"], "max_accuracy_drop", 1.5, pre=["--eval", "{qeval}"]),
    Row("--max-perplexity-increase", ["--max-perplexity-increase", "3"], error="applies to causal LMs"),
    Row("--new-tokens", ["--new-tokens", "8"], "new_tokens", 8),
    Row("--norm-steps", ["--norm-steps", "3"], error="applies to causal LMs"),
    Row("--norm-lr", ["--norm-lr", "1e-4"], "norm_lr", 1e-4),
    Row("--export-dequantized", ["--export-dequantized"], "export_dequantized", True, pre=["--scheme", "int4"]),
    Row("--no-export-dequantized", ["--no-export-dequantized"], "export_dequantized", False,
        pre=["--scheme", "int4", "--export-dequantized"]),
    Row("--calib", ["--calib", "{qeval}"], "calib", "{qeval}"),
    Row("--calib-samples", ["--calib-samples", "64"], "calib_samples", 64),
    Row("--qat-steps", ["--qat-steps", "2"], "qat_steps", 2, pre=["--scheme", "int4", "--train", "{qeval}"]),
    Row("--train", ["--train", "{qeval}"], "train", "{qeval}"),
    Row("--qat-lr", ["--qat-lr", "1e-4"], "qat_lr", 1e-4),
    Row("--qat-batch-size", ["--qat-batch-size", "4"], "qat_batch_size", 4),
    Row("--print-config", []),
]

ROWS = {"prune": PRUNE_ROWS, "quantize": QUANT_ROWS}
SETTINGS = {"prune": PruneSettings, "quantize": QuantizeSettings}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny model folders, data and config files, by the names the rows use."""
    root = tmp_path_factory.mktemp("flags")
    f: dict[str, Path] = {
        "pmodel": make_prune_bert(root / "pmodel"), "pmodel2": make_prune_bert(root / "pmodel2", seed=1),
        "ptrain": write_tsv(root / "ptrain.tsv", keyword_rows(48)),
        "peval": write_tsv(root / "peval.tsv", keyword_rows(16, seed=1)),
        "dmodel": make_tiny_chat_llama(root / "dmodel"), "dtrain": write_jsonl(root / "dtrain.jsonl", polarity_rows(8)),
        "qmodel": make_quant_bert(root / "q1"), "qmodel2": make_quant_bert(root / "q2", seed=1),
        "qeval": write_tsv(root / "qeval.tsv", random_label_rows(24)),
        "out": root / "out", "out2": root / "out2",
    }
    recipe = {"output": str(root / "run"), "prune": {"ffn": 0.5}, "quantize": {"group_size": 16}}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(recipe))
    (root / "prune.yaml").write_text(yaml.safe_dump({"scope": "layer"}))  # a flat file, like OUT/prune.yaml
    (root / "quantize.yaml").write_text(yaml.safe_dump({"granularity": "tensor"}))
    f.update(prune_recipe=root / "pipeline.yaml", quant_recipe=root / "pipeline.yaml",
             prune_flat=root / "prune.yaml", quant_flat=root / "quantize.yaml")
    return {k: str(v) for k, v in f.items()}


@pytest.fixture(autouse=True)
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """--print-config must stop before any weight loads."""
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("--print-config loaded weights")

    monkeypatch.setattr(slimtune.compress.prune.recipe, "load_model", refuse)
    monkeypatch.setattr(slimtune.compress.prune.decoder_recipe, "load_model", refuse)
    monkeypatch.setattr(slimtune.compress.quant.recipe, "load_model", refuse)


def _fill(v: Any, files: dict[str, str]) -> Any:
    if isinstance(v, list):
        return [_fill(x, files) for x in v]
    return v.format(**files) if isinstance(v, str) else v


def _base(cmd: str, files: dict[str, str]) -> list[str]:
    if cmd == "prune":  # prune needs something to prune
        return ["--model", files["pmodel"], "--output", files["out"], "--sparsity", "0.5"]
    return ["--model", files["qmodel"], "--output", files["out"]]


def _resolved(capsys: pytest.CaptureFixture[str], cmd: str, argv: list[str]) -> tuple[int, Any, str]:
    rc = main([cmd, *argv, "--print-config"])
    cap = capsys.readouterr()
    return rc, (yaml.safe_load(cap.out) if rc == 0 else None), cap.err


def _flags(cmd: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices[cmd]._actions for o in a.option_strings if o not in ("-h", "--help")}


@pytest.mark.parametrize("cmd", list(ROWS))
def test_every_flag_has_a_row(cmd: str) -> None:
    flags, rows = _flags(cmd), {r.flag for r in ROWS[cmd]}
    assert flags - rows == set(), f"{cmd}: flags without a row in {__name__}"
    assert rows - flags == set(), f"{cmd}: rows for flags that do not exist"


@pytest.mark.parametrize("cmd", list(ROWS))
def test_flag_contract(cmd: str, files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    covered = set()
    for row in ROWS[cmd]:
        base = _base(cmd, files) + _fill(row.pre, files)
        if row.flag == "--print-config":
            rc, tree, err = _resolved(capsys, cmd, base)
            assert rc == 0, err
            expect = {"prune": lambda: PruneSettings(model=files["pmodel"], output=files["out"], sparsity=0.5),
                      "quantize": lambda: QuantizeSettings(model=files["qmodel"], output=files["out"])}[cmd]()
            assert tree == settings_dict(expect)
            covered.add(row.flag)
            continue
        rc, tree, err = _resolved(capsys, cmd, base + _fill(row.argv, files))
        if row.error is not None:
            assert rc == 2 and row.error in err and "Traceback" not in err, (row.flag, err)
            covered.add(row.flag)
            continue
        assert rc == 0, (row.flag, err)
        want = _fill(row.value, files)
        assert tree[row.key] == want, (row.flag, tree[row.key], want)
        rc0, before, err0 = _resolved(capsys, cmd, base)
        assert rc0 == 0, (row.flag, err0)
        assert before[row.key] != want, f"{row.flag}: {row.key} is {want!r} without the flag too"
        covered.add(row.flag)
    assert covered == _flags(cmd)
    print(f"{cmd}: {len(covered)} flags covered")


def test_pair_count() -> None:
    pairs = sum(len(_flags(cmd)) for cmd in ROWS)
    print(f"prune x quantize flag contract: {pairs} command x flag pairs")
    assert pairs == len({(c, r.flag) for c, rows in ROWS.items() for r in rows})


# --------------------------------------------------------------------------------------------
# Flags that change numerics: real runs on tiny models, the artifacts change accordingly
# --------------------------------------------------------------------------------------------

FAST = ["--seq-len", "16", "--repeats", "2"]


@pytest.fixture
def real(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # these runs load weights


def _quantize(capsys: pytest.CaptureFixture[str], files: dict[str, str], out: Path, *args: str) -> dict[str, Any]:
    rc = main(["quantize", "--model", files["qmodel"], "--output", str(out), *FAST, *args])
    err = capsys.readouterr().err
    assert rc == 0, err
    side = json.loads((out / "quantization.json").read_text()) if (out / "quantization.json").is_file() else None
    return {"metrics": json.loads((out / "metrics.json").read_text()), "side": side,
            "tensors": load_file(out / "quantized.safetensors") if side else None}


QKEY = "bert.encoder.layer.0.attention.self.query.weight"


def test_int8_granularity_and_symmetry_reach_the_codes(real, files, capsys, tmp_path) -> None:
    runs = {name: _quantize(capsys, files, tmp_path / name, "--backend", "torch", *args)
            for name, args in {"channel": [], "tensor": ["--granularity", "tensor"],
                               "asym": ["--asymmetric"]}.items()}
    for name, r in runs.items():
        meta = r["side"]["tensors"][QKEY]
        assert meta["granularity"] == ("tensor" if name == "tensor" else "channel")
        assert meta["symmetric"] == (name != "asym")
        cfg = r["metrics"]["config"]  # what metrics.json reports is what the codes are
        assert (cfg["granularity"], cfg["symmetric"]) == (meta["granularity"], meta["symmetric"])
    t = {n: r["tensors"] for n, r in runs.items()}
    assert t["tensor"][QKEY.replace("weight", "weight.scale")].numel() == 1
    assert t["channel"][QKEY.replace("weight", "weight.scale")].numel() == 64
    assert QKEY.replace("weight", "weight.zero_point") in t["asym"]
    assert QKEY.replace("weight", "weight.zero_point") not in t["channel"]
    assert not torch.equal(t["tensor"][QKEY.replace("weight", "weight.qdata")],
                           t["channel"][QKEY.replace("weight", "weight.qdata")])


def test_int8_onnxruntime_granularity_and_embeddings(real, files, capsys, tmp_path) -> None:
    r = _quantize(capsys, files, tmp_path / "ort", "--backend", "onnxruntime", "--granularity", "tensor",
                  "--no-embeddings")
    q = json.loads((tmp_path / "ort" / "onnx.json").read_text())["quantization"]
    assert q["per_channel"] is False and "Gather" not in q["quantized_ops"]
    assert r["metrics"]["config"]["granularity"] == "tensor" and r["metrics"]["config"]["include_embeddings"] is False


def test_int4_group_size_symmetry_and_embeddings(real, files, capsys, tmp_path) -> None:
    a = _quantize(capsys, files, tmp_path / "g32", "--scheme", "int4")
    b = _quantize(capsys, files, tmp_path / "g16", "--scheme", "int4", "--group-size", "16", "--symmetric",
                  "--no-embeddings")
    scale = QKEY.replace("weight", "weight.scale")
    assert b["tensors"][scale].numel() == 2 * a["tensors"][scale].numel()
    assert (a["side"]["tensors"][QKEY]["group_size"], b["side"]["tensors"][QKEY]["group_size"]) == (32, 16)
    assert (a["side"]["tensors"][QKEY]["symmetric"], b["side"]["tensors"][QKEY]["symmetric"]) == (False, True)
    emb = "bert.embeddings.word_embeddings.weight"
    assert emb in a["side"]["tensors"] and emb not in b["side"]["tensors"]


def test_kmeans_bits(real, files, capsys, tmp_path) -> None:
    r2 = _quantize(capsys, files, tmp_path / "k2", "--scheme", "kmeans", "--bits", "2")
    r4 = _quantize(capsys, files, tmp_path / "k4", "--scheme", "kmeans")
    book = QKEY.replace("weight", "weight.codebook")
    assert r2["tensors"][book].shape[-1] == 4 and r4["tensors"][book].shape[-1] == 16


def test_quantize_gates_refuse_and_write_nothing(real, files, capsys, tmp_path) -> None:
    out = tmp_path / "gated"
    rc = main(["quantize", "--model", files["qmodel"], "--output", str(out), "--scheme", "nf4", "--min-sqnr", "200",
               *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "--min-sqnr 200 dB" in err and "nothing written" in err
    assert not out.exists() and not list(tmp_path.glob(".gated*"))


def _prune(capsys: pytest.CaptureFixture[str], files: dict[str, str], out: Path, *args: str) -> dict[str, Any]:
    rc = main(["prune", "--model", files["pmodel"], "--output", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 0, err
    return json.loads((out / "metrics.json").read_text())


def test_prune_scope_sets_per_layer_sparsity(real, files, capsys, tmp_path) -> None:
    g = _prune(capsys, files, tmp_path / "global", "--sparsity", "0.5")["sparsity"]["per_layer"]
    lay = _prune(capsys, files, tmp_path / "layer", "--sparsity", "0.5", "--scope", "layer")["sparsity"]["per_layer"]
    spread = {name: max(v.values()) - min(v.values()) for name, v in (("global", g), ("layer", lay))}
    assert spread["layer"] < 0.02 < spread["global"]


def test_prune_vocab_thresholds(real, files, capsys, tmp_path) -> None:
    sizes = {name: _prune(capsys, files, tmp_path / name, "--vocab-from", files["ptrain"], *args)["vocab"]["vocab_size_after"]
             for name, args in {"all": [], "nochars": ["--no-vocab-chars"],
                                "rare-dropped": ["--no-vocab-chars", "--vocab-min-count", "40"]}.items()}
    assert sizes["rare-dropped"] < sizes["nochars"] < sizes["all"]
