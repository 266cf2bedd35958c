"""``slimtune quantize`` end to end on a tiny model folder, and its errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import make_quant_bert, make_tiny_llama, quant_tokenizer, random_label_rows, write_tsv

from slimtune.cli.main import main
from slimtune.compress.quant.api import quantize_
from slimtune.compress.quant.recipe import QuantizeError, make_config
from slimtune.models.loading import load_model
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
    (["--scheme", "kmeans", "--bits", "12"], "--bits: must be in [1, 8], got 12"),
    (["--scheme", "nf4", "--bits", "8"], "nf4 is a 4-bit code"),
    (["--scheme", "int4", "--backend", "onnxruntime"], "--backend applies to int8"),
    (["--scheme", "fp32", "--backend", "torch"], "--scheme fp32 only writes the fp32 ONNX folder"),
    (["--scheme", "int8", "--group-size", "1", "--granularity", "group"], "--group-size: must be >= 2"),
    # int8 settings no backend can run are refused, never silently replaced by per-channel symmetric
    (["--scheme", "int8", "--granularity", "group"], "no int8 backend runs these settings (int8 kernels take one scale"),
    (["--scheme", "int8", "--backend", "onnxruntime", "--asymmetric"], "ONNX Runtime's dynamic int8 weights are symmetric"),
    (["--scheme", "int8", "--backend", "torchao"], "torchao leaves the embedding tables in float"),
    (["--scheme", "int4", "--granularity", "tensor", "--calib", "x.tsv"], "--calib feeds int8's mixed-precision search"),
    (["--scheme", "int8", "--export-dequantized"], "--export-dequantized applies to int4, nf4 and kmeans"),
    (["--scheme", "fp32", "--granularity", "tensor"], "--granularity does not apply to --scheme fp32"),
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


# --------------------------------------------------------------------------------------------
# Regressions: settings applied as reported, gates for every scheme, decoders refused, settings saved
# --------------------------------------------------------------------------------------------


def test_int8_torch_applies_granularity_and_asymmetry(setup, capsys) -> None:
    """`--scheme int8` used to build per-channel symmetric codes whatever the flags, while
    metrics.json reported the flags."""
    tmp, model, ev = setup
    out = tmp / "int8-tensor-asym"
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int8", "--backend", "torch", "--granularity", "tensor",
                    "--asymmetric", "--eval", str(ev), "--output", str(out), *FAST)
    assert rc == 0, text
    m = json.loads((out / "metrics.json").read_text())
    side = json.loads((out / "quantization.json").read_text())
    q = side["tensors"]["bert.encoder.layer.0.attention.self.query.weight"]
    assert (q["granularity"], q["symmetric"]) == ("tensor", False) == (m["config"]["granularity"], m["config"]["symmetric"])
    codes = load_file(out / "quantized.safetensors")
    assert codes["bert.encoder.layer.0.attention.self.query.weight.scale"].numel() == 1
    assert "bert.encoder.layer.0.attention.self.query.weight.zero_point" in codes
    assert m["backend_candidate"] == "torch-int8-tensor"
    logits = load_classifier(out)(torch.tensor([[2, 5, 6, 3]]))  # served by fbgemm with the zero points
    assert logits.shape == (1, 2)


def test_int8_auto_builds_only_backends_that_can_run_the_settings(setup, capsys) -> None:
    tmp, model, _ = setup
    out = tmp / "int8-auto-asym"
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int8", "--asymmetric", "--output", str(out), *FAST)
    assert rc == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["candidates"]) == {"torch-int8-channel"} and m["config"]["symmetric"] is False
    assert "symmetric" in m["failed_backends"]["onnxruntime"] and "torchao" in m["failed_backends"]


def test_gates_apply_to_every_scheme_and_write_nothing(setup, capsys) -> None:
    """int4 at a few dB used to be accepted with --min-sqnr 100 (the gates were int8-only)."""
    tmp, model, ev = setup
    out = tmp / "gated"
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int4", "--output", str(out), *FAST)  # an older output
    assert rc == 0, text
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for scheme in ("int4", "nf4", "kmeans"):
        rc, text = _run(capsys, "--model", str(model), "--scheme", scheme, "--eval", str(ev), "--min-sqnr", "100",
                        "--output", str(out), "--overwrite", *FAST)
        assert rc == 2 and f"--scheme {scheme}: logits SQNR" in text and "< --min-sqnr 100 dB" in text, text
        assert "nothing written" in text and "Traceback" not in text
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the older output is untouched
    assert not [p for p in tmp.iterdir() if p.name.startswith(".gated")]  # no temp folder left


def test_accuracy_gate_on_a_weight_only_scheme(setup, capsys) -> None:
    tmp, _, _ = setup
    model = make_quant_bert(tmp / "seed2", seed=2)  # its 2-bit per-tensor k-means flips predictions
    texts = [t for t, _ in random_label_rows(40, seed=3)]
    enc = quant_tokenizer(tmp / "gate-tok")(texts, padding=True, return_tensors="pt")
    fp32 = load_model(str(model), "classification").eval()
    with torch.inference_mode():
        pred = fp32(**enc).logits.argmax(-1)
        flips = int((quantize_(fp32, make_config("kmeans", bits=2, granularity="tensor"))(**enc).logits.argmax(-1)
                     != pred).sum())
    assert flips > 0, "precondition: this tiny model must lose accuracy at 2 bits"
    own = write_tsv(tmp / "own-labels.tsv", [(t, f"c{y}") for t, y in zip(texts, pred.tolist(), strict=True)])
    base = ["--model", str(model), "--scheme", "kmeans", "--bits", "2", "--granularity", "tensor", "--eval", str(own),
            *FAST]
    rc, text = _run(capsys, *base, "--max-accuracy-drop", "0", "--output", str(tmp / "acc-gated"))
    assert rc == 2 and "accuracy drop" in text and "> --max-accuracy-drop 0 pt (fp32 1.0000" in text, text
    assert not (tmp / "acc-gated").exists()
    rc, text = _run(capsys, *base, "--output", str(tmp / "acc-free"))  # no gate unless given: still written
    assert rc == 0, text
    assert json.loads((tmp / "acc-free" / "metrics.json").read_text())["gates"] == {"min_sqnr_db": None,
                                                                                 "max_accuracy_drop": None}


def test_causal_lm_folder_gets_the_decoder_rules(tmp_path, capsys) -> None:
    """A causal LM is quantized as a decoder (tests/test_quantize_decoder.py), never as a classifier:
    the classifier-only schemes are refused with the reason."""
    llama = make_tiny_llama(tmp_path / "llama")
    rc, text = _run(capsys, "--model", str(llama), "--scheme", "kmeans", "--output", str(tmp_path / "o"))
    assert rc == 2 and "a causal LM is quantized to int8 or int4" in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_settings_saved_beside_the_output_repeat_the_run(setup, capsys) -> None:
    tmp, model, _ = setup
    first, again = tmp / "int4-g16", tmp / "int4-g16-again"
    rc, text = _run(capsys, "--model", str(model), "--scheme", "int4", "--group-size", "16", "--no-embeddings",
                    "--output", str(first), *FAST)
    assert rc == 0, text
    saved = yaml.safe_load((first / "quantize.yaml").read_text())
    assert saved["scheme"] == "int4" and saved["group_size"] == 16 and saved["include_embeddings"] is False
    rc, text = _run(capsys, "--config", str(first / "quantize.yaml"), "--output", str(again))
    assert rc == 0, text
    assert yaml.safe_load((again / "quantize.yaml").read_text()) == {**saved, "output": str(again)}
    a, b = load_file(first / "quantized.safetensors"), load_file(again / "quantized.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_print_config_reads_a_pipeline_section(setup, capsys, tmp_path) -> None:
    _, model, _ = setup
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(yaml.safe_dump({"output": "x", "quantize": {"scheme": "nf4", "group_size": 32}}))
    rc, text = _run(capsys, "--config", str(recipe), "--model", str(model), "--output", "o", "--print-config")
    assert rc == 0, text
    tree = yaml.safe_load(text)
    assert (tree["scheme"], tree["group_size"], tree["model"]) == ("nf4", 32, str(model))
