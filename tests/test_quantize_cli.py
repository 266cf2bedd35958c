"""``slimtune quantize`` end to end on a tiny model folder, and its errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_quant_bert, random_label_rows, write_tsv

from slimtune.cli.main import main
from slimtune.compress.quant.recipe import QuantizeError, make_config
from slimtune.runtime.classifier import load_classifier

FAST = ["--seq-len", "16", "--repeats", "3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, tiny classifier folder with labels c0/c1, 40-row eval TSV with random labels)."""
    tmp = tmp_path_factory.mktemp("cli")
    return tmp, make_quant_bert(tmp), write_tsv(tmp / "eval.tsv", random_label_rows(40))


def _run(capsys, *args: str) -> tuple[int, str]:
    rc = main(["quantize", *args])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_int8_auto_picks_a_measured_backend(setup, capsys) -> None:
    tmp, model, ev = setup
    out = tmp / "int8"
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int8", "--eval", str(ev), "--output", str(out), *FAST)
    assert rc == 0, text
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "size_mb", "sqnr_db", "latency_ms_p50", "backend", "backend_reason", "compression", "speedup"):
        assert key in m, key
    assert m["backend_candidate"] in m["candidates"] and m["sqnr_db"] >= 25
    assert {"onnxruntime-int8-fused", "torch-int8-channel"} <= set(m["candidates"])
    assert m["candidates"][m["backend_candidate"]]["latency_ms_p50"] == min(
        c["latency_ms_p50"] for c in m["candidates"].values() if "latency_ms_p50" in c and c["size_mb"])
    clf = load_classifier(out)  # whichever backend won, the same call serves it
    logits = clf(torch.tensor([[2, 5, 6, 3]]), torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 2)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_int8_forced_backend(setup, capsys, backend: str) -> None:
    tmp, model, _ = setup
    out = tmp / f"int8-{backend}"
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int8", "--backend", backend, "--output", str(out), *FAST)
    assert rc == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert m["backend"] == backend and m["accuracy"] is None  # no --eval: SQNR on the latency input
    assert ((out / "model.onnx").is_file()) == (backend == "onnxruntime")
    assert ((out / "quantization.json").is_file()) == (backend == "torch")


def test_int4_group_writes_compact_folder_and_dequantized_export(setup, capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    tmp, model, ev = setup
    out = tmp / "int4"
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int4", "--granularity", "group", "--group-size", "16",
                    "--eval", str(ev), "--output", str(out), "--export-dequantized", *FAST)
    assert rc == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert m["roundtrip_exact"] and m["config"]["group_size"] == 16 and m["compression"] > 3
    side = json.loads((out / "quantization.json").read_text())
    assert side["scheme"] == "int4" and side["granularity"] == "group"
    plain = AutoModelForSequenceClassification.from_pretrained(out / "dequantized")
    assert plain.config.id2label == {0: "c0", 1: "c1"}


def test_fp32_onnx_folder(setup, capsys) -> None:
    tmp, model, _ = setup
    out = tmp / "fp32-onnx"
    rc, text = _run(capsys, "--model", str(model), "--scheme", "fp32", "--backend", "onnxruntime", "--output", str(out), *FAST)
    assert rc == 0, text
    assert {"model.onnx", "config.json", "tokenizer.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "metrics.json").read_text())["sqnr_db"] > 60


@pytest.mark.parametrize(("args", "message"), [
    (["--scheme", "int8", "--bits", "4"], "--bits 4 contradicts --scheme int8"),
    (["--scheme", "int4", "--granularity", "channel", "--group-size", "32"], "--group-size needs --granularity group"),
    (["--scheme", "int4", "--group-size", "48"], "bert.embeddings.word_embeddings: group_size 48 does not divide"),
    (["--scheme", "kmeans", "--granularity", "group"], "kmeans codebooks are per tensor or per channel"),
    (["--scheme", "kmeans", "--bits", "12"], "k-means bits must be in 1..8"),
    (["--scheme", "nf4", "--bits", "8"], "nf4 is a 4-bit code"),
    (["--scheme", "int4", "--backend", "onnxruntime"], "--backend applies to int8"),
    (["--scheme", "fp32", "--backend", "torch"], "--scheme fp32 only writes the fp32 ONNX folder"),
    (["--scheme", "int8", "--group-size", "1", "--granularity", "group"], "--group-size must be >= 2"),
])
def test_bad_arguments_fail_with_one_clear_line(setup, capsys, args, message) -> None:
    tmp, model, _ = setup
    rc, text = _run(capsys, "--model", str(model), "--output", str(tmp / "bad"), *FAST, *args)
    assert rc == 2
    assert message in text and "Traceback" not in text
    assert not (tmp / "bad").exists()  # nothing half-written


def test_bad_paths_name_the_file(setup, capsys, tmp_path) -> None:
    tmp, model, _ = setup
    rc, text = _run(capsys, "--model", str(tmp_path / "nope"), "--scheme", "int8", "--output", str(tmp_path / "o"))
    assert rc == 2 and "nope: not a model folder (no config.json)" in text
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int4", "--eval", str(tmp_path / "missing.tsv"),
                    "--output", str(tmp_path / "o"), *FAST)
    assert rc == 2 and "missing.tsv: file not found" in text
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\tc7\n")
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int4", "--eval", str(bad), "--output", str(tmp_path / "o"), *FAST)
    assert rc == 2 and "bad.tsv:2: label 'c7' was not seen in training" in text
    f = tmp_path / "file"
    f.write_text("x")
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int4", "--output", str(f), *FAST)
    assert rc == 2 and "exists and is not a folder" in text


def test_unknown_scheme_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--model", "m", "--scheme", "int3", "--output", "o"])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def test_make_config_defaults() -> None:
    c = make_config("int4")
    assert (c.granularity, c.group_size, c.symmetric) == ("group", 32, False)
    assert make_config("int8").granularity == "channel"
    assert make_config("nf4", group_size=128).block_size == 128
    assert make_config("kmeans", bits=2, granularity="tensor").bits == 2
    with pytest.raises(QuantizeError):
        make_config("int9")


def test_int4_with_qat_recovery(setup, capsys) -> None:
    tmp, model, ev = setup
    out = tmp / "int4-qat"
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int4", "--eval", str(ev), "--train", str(ev),
                    "--qat-steps", "2", "--output", str(out), *FAST)
    assert rc == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert m["qat"]["steps"] == 2 and "ptq_accuracy" in m["qat"] and "QAT recovery: 2 steps" in text
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int4", "--qat-steps", "2", "--output", str(tmp / "x"), *FAST)
    assert rc == 2 and "--qat-steps needs --train" in text
