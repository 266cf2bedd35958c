"""ONNX export (fp32 and int8) parity in onnxruntime, self-describing folders, the int8
backends and the choice between them. Tiny random models only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import quant_bert as tiny_bert
from tiny import quant_tokenizer as tiny_tokenizer

pytest.importorskip("onnxruntime")

from slimtune.compress.quant import backends as B  # noqa: E402
from slimtune.compress.quant.api import Int8WeightConfig, QuantizedLinear, quantize_  # noqa: E402
from slimtune.compress.quant.linear import sqnr_db  # noqa: E402
from slimtune.compress.quant.onnx import load_onnx_classifier, write_onnx_folder  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, tokenizer, fp32 ONNX folder, int8 ONNX folder), built once."""
    tmp = tmp_path_factory.mktemp("onnx")
    model, tok = tiny_bert(), tiny_tokenizer(tmp / "tok")
    fp32 = tmp / "fp32"
    int8 = tmp / "int8"
    write_onnx_folder(model, fp32, tok, optimize=True, quantize=False)
    write_onnx_folder(model, int8, tok, optimize=True, quantize=True)
    return model, tok, fp32, int8


def _batch(tok, texts):
    return tok(texts, padding=True, return_tensors="pt")


TEXTS = ["good film", "the plot was dull and the acting very weak but the movie is not boring", "superb"]


def test_fp32_onnx_matches_torch_on_new_shapes(exported) -> None:
    model, tok, fp32, _ = exported
    clf = load_onnx_classifier(fp32)
    for texts in (TEXTS, TEXTS[:1], TEXTS * 3):  # other batch sizes and sequence lengths than export
        enc = _batch(tok, texts)
        with torch.inference_mode():
            ref = model(**enc).logits
        torch.testing.assert_close(clf(**enc), ref, rtol=1e-4, atol=1e-5)


def test_export_fuses_bert_and_keeps_model_in_eval_mode(exported) -> None:
    model, _, fp32, int8 = exported
    info = json.loads((fp32 / "onnx.json").read_text())
    assert info["fusions"]["Attention"] == 2 and info["fusions"]["EmbedLayerNormalization"] == 1
    assert info["export_max_abs_diff"] < 1e-4
    assert not model.training and not any(m.training for m in model.modules())
    assert model.config._attn_implementation == tiny_bert().config._attn_implementation  # restored
    q = json.loads((int8 / "onnx.json").read_text())["quantization"]
    assert q["per_channel"] and "Gather" in q["quantized_ops"]


def test_int8_onnx_parity_and_size(exported) -> None:
    model, tok, fp32, int8 = exported
    enc = _batch(tok, TEXTS * 4)
    with torch.inference_mode():
        ref = model(**enc).logits
    got = load_onnx_classifier(int8)(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert sqnr_db(ref, got) >= 25.0
    assert (int8 / "model.onnx").stat().st_size * 2.5 < (fp32 / "model.onnx").stat().st_size


def test_onnx_folder_serves_with_plain_onnxruntime_and_tokenizers(exported) -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    model, tok, fp32, _ = exported
    cfg = json.loads((fp32 / "config.json").read_text())
    assert cfg["id2label"] == {"0": "c0", "1": "c1"}
    t = Tokenizer.from_file(str(fp32 / "tokenizer.json"))
    enc = t.encode("good film")
    feeds = {"input_ids": np.array([enc.ids], dtype=np.int64),
             "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
             "token_type_ids": np.array([enc.type_ids], dtype=np.int64)}
    logits = ort.InferenceSession(str(fp32 / "model.onnx")).run(["logits"], feeds)[0]
    with torch.inference_mode():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5)


def test_onnx_classifier_defaults_and_inputs(exported) -> None:
    _, tok, fp32, _ = exported
    clf = load_onnx_classifier(fp32)
    enc = _batch(tok, ["good film"])
    a = clf(enc["input_ids"])  # mask defaults to ones, token types to zeros
    b = clf(enc["input_ids"].tolist(), enc["attention_mask"].numpy(), None)
    assert a.shape == (1, 2) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert clf.id2label == {0: "c0", 1: "c1"} and "token_type_ids" in clf.input_names


def test_load_onnx_classifier_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.onnx: not found"):
        load_onnx_classifier(tmp_path)


def test_dynamo_exporter_parity(tmp_path) -> None:
    model, tok = tiny_bert(layers=1), tiny_tokenizer(tmp_path / "tok")
    info = write_onnx_folder(model, tmp_path / "dyn", tok, optimize=False, exporter="dynamo")
    assert info["exporter"] == "dynamo" and info["export_max_abs_diff"] < 1e-4
    enc = _batch(tok, TEXTS)
    with torch.inference_mode():
        torch.testing.assert_close(load_onnx_classifier(tmp_path / "dyn")(**enc), model(**enc).logits,
                                   rtol=1e-4, atol=1e-5)


def test_torch_dynamic_backend_reuses_slimtune_codes() -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    model = tiny_bert()
    q = quantize_(tiny_bert(), Int8WeightConfig())
    lin = q.bert.encoder.layer[0].attention.self.query
    assert isinstance(lin, QuantizedLinear)
    codes = lin.qdata.clone()
    B.to_torch_dynamic(q)
    dyn = q.bert.encoder.layer[0].attention.self.query
    assert isinstance(dyn, DynLinear)
    assert torch.equal(dyn.weight().int_repr(), codes)  # the very same int8 codes
    ids = torch.randint(5, 64, (2, 12))
    with torch.inference_mode():
        assert sqnr_db(model(input_ids=ids).logits, q(input_ids=ids).logits) >= 25.0


def test_choose_picks_fastest_passing_candidate() -> None:
    def cand(name, sqnr, acc, ms):
        c = B.Candidate(name, "x", lambda b: None)
        c.metrics.update(sqnr_db=sqnr, accuracy=acc, latency_ms_p50=ms)
        return c

    fast_bad = cand("fast-but-wrong", 12.0, 0.80, 1.0)
    slow_ok = cand("slow", 40.0, 0.90, 9.0)
    mid_ok = cand("mid", 35.0, 0.899, 5.0)
    best, why = B.choose([fast_bad, slow_ok, mid_ok], 0.90, min_sqnr_db=25, max_accuracy_drop=0.5)
    assert best is mid_ok
    assert "fast-but-wrong: SQNR 12.0 dB < 25" in why and "slow 9.0 ms" in why
    best, why = B.choose([fast_bad], 0.90, min_sqnr_db=25, max_accuracy_drop=0.5)
    assert best is None and "no candidate passed" in why


def test_time_candidates_prescreen_drops_slow_ones() -> None:
    import time

    def ref(b):
        return time.sleep(0.001)

    def fast(b):
        return time.sleep(0.001)

    def slow(b):
        return time.sleep(0.03)

    lat, dropped = B.time_candidates({"ref": ref, "fast": fast, "slow": slow}, {}, repeats=3, prescreen_ratio=3.0)
    assert "slow" in dropped and "pre-screen" in dropped["slow"] and set(lat) == {"ref", "fast"}
    # The fastest candidate is never dropped: a forced backend is the only candidate.
    lat, dropped = B.time_candidates({"ref": ref, "slow": slow}, {}, repeats=3, prescreen_ratio=3.0)
    assert dropped == {} and set(lat) == {"ref", "slow"}


def test_mixed_precision_keeps_float_activations_with_int8_weights(tmp_path) -> None:
    import onnx

    from slimtune.data.datasets import TokenizedData

    model, tok = tiny_bert(), tiny_tokenizer(tmp_path / "tok")
    g = torch.Generator().manual_seed(0)
    calib = TokenizedData([[2, *torch.randint(5, 30, (9,), generator=g).tolist(), 3] for _ in range(16)], None, None, 0)
    # An unreachable target forces the search to its cap: exactly max_layers float-activation layers.
    c = B.build_onnxruntime_mixed(model, tmp_path, tok, calib, target_db=500.0, max_layers=2)
    mp = c.info["mixed_precision"]
    assert len(mp["float_activation_layers"]) == 2 and len(mp["calib_sqnr_trace"]) == 3
    assert mp["ranking"][0][0] <= mp["ranking"][-1][0]  # worst layer first
    graph = onnx.load(str(c.path / "model.onnx")).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("_weight_dq")]
    assert len(dq) == 2 and c.info["quantization"]["weight_only_int8_nodes"] == 2
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
              and i.dims[0] * i.dims[1] >= 64 * 64}
    assert not floats - {"model.bert.embeddings.position_embeddings.weight"}  # no big float matrix left
    enc = _batch(tok, TEXTS)
    with torch.inference_mode():
        assert sqnr_db(model(**enc).logits, c.predict(dict(enc))) >= 25.0
    assert B.build_onnxruntime_mixed(model, tmp_path / "easy", tok, calib, target_db=-100.0) is None
