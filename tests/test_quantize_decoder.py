"""``slimtune quantize`` on a causal LM: kernels exact, candidates measured, the output still a causal LM."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers_chat import polarity_rows, write_jsonl
from helpers_export import make_bpe_llama
from safetensors.torch import load_file

from slimtune.cli.main import main
from slimtune.compress.quant.api import Int4WeightConfig, Int8WeightConfig, quantize_
from slimtune.compress.quant.kernels import Int4KernelLinear, Int8KernelLinear, to_kernels
from slimtune.runtime.llamacpp import llamacpp_available

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python is not installed")


@pytest.mark.parametrize("cfg, kernel", [
    (Int8WeightConfig(include_embeddings=False), Int8KernelLinear),
    (Int4WeightConfig(group_size=32, include_embeddings=False), Int4KernelLinear),
    (Int4WeightConfig(group_size=64, symmetric=True, include_embeddings=False), Int4KernelLinear),
])
def test_kernels_compute_what_the_codes_decode_to(cfg, kernel):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Linear(96, 64, bias=False)) if cfg.group_size != 64 else torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 64, bias=False))
    q = quantize_(copy.deepcopy(m), cfg)
    ref = torch.nn.Sequential(*[layer.to_float() for layer in q])  # F.linear on the decoded weights
    k = copy.deepcopy(q)
    swapped = to_kernels(k)
    assert set(swapped.values()) == {kernel.__name__} and len(swapped) == 2
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(k(x), ref(x), rtol=1e-4, atol=1e-4)
    assert (k(x) - m(x)).abs().max() > 0  # the codes are not the float weights: a real quantization


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _bpe_llama_and_chat(tmp: Path) -> tuple[Path, Path]:
    model = make_bpe_llama(tmp / "llama", hidden=64, intermediate=128)
    rows = [{"messages": [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]}
            for r in polarity_rows(12)]
    return model, write_jsonl(tmp / "eval.jsonl", rows)


def test_decoder_quantize_torch_backend_stays_a_causal_lm(tmp_path, capsys):
    model, chat = _bpe_llama_and_chat(tmp_path)
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(model), "--scheme", "int8", "--backend", "torch", "--eval", str(chat),
               "--output", str(out), "--seq-len", "16", "--new-tokens", "4", "--repeats", "1"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "causal-lm" and m["backend_candidate"] == "torch-int8"
    assert abs(m["perplexity"] / m["fp32"]["perplexity"] - 1) < 0.05
    q = json.loads((out / "quantization.json").read_text())
    assert q["kernel"] == "torch-int8" and q["task"] == "causal-lm"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "quantize.yaml").is_file()


@needs_llamacpp
def test_decoder_quantize_auto_measures_llamacpp_and_torch(tmp_path, capsys):
    model, chat = _bpe_llama_and_chat(tmp_path)
    out = tmp_path / "q4"
    rc = main(["quantize", "--model", str(model), "--scheme", "int4", "--eval", str(chat), "--output", str(out),
               "--seq-len", "16", "--new-tokens", "4", "--repeats", "1", "--max-perplexity-increase", "1000"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["candidates"]) == {"llama.cpp-q4_0", "llama.cpp-q4_k_m", "torch-int4"}  # no calibration file
    fastest = max(m["candidates"], key=lambda n: m["candidates"][n]["decode_tokens_per_s"])
    assert m["backend_candidate"] == fastest
    chosen = m["candidates"][fastest]
    assert chosen["perplexity"] > 1 and chosen["perplexity"] == m["perplexity"]
    for c in m["candidates"].values():  # the gate (1000%) passes the fastest: the slower ones are not scored
        assert c["decode_tokens_per_s"] > 0
        assert ("perplexity" in c) != ("not_scored" in c), c
        assert c is chosen or "slower than " + fastest in c["not_scored"]


    if m["backend"] == "llama.cpp":
        assert (out / "model.gguf").is_file() and (out / "tokenizer.json").is_file() and (out / "gguf.json").is_file()


def test_decoder_quantize_scores_down_to_the_first_within_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    import slimtune.compress.quant.decoder as dec

    scored: list[str] = []
    ppl = {"fp32": 10.0, "fast": 12.0, "mid": 10.2, "slow": 10.1}  # fast misses a 5% gate, mid passes

    def fake_score(c, data, threads):  # noqa: ANN001, ANN202
        scored.append(c.name)
        c.metrics["perplexity"] = ppl[c.name]

    monkeypatch.setattr(dec, "score", fake_score)
    fp32 = dec._Cand("fp32", "torch", metrics={"decode_tokens_per_s": 10})
    cands = [dec._Cand(n, "llama.cpp", metrics={"decode_tokens_per_s": v}) for n, v in (("slow", 20), ("fast", 40),
                                                                                       ("mid", 30))]
    dec.score_fastest_first(fp32, cands, None, 1, 5.0)
    assert scored == ["fp32", "fast", "mid"]  # fastest first, stop at the first within the gate
    assert "slower than mid" in cands[0].metrics["not_scored"] and "perplexity" not in cands[0].metrics
    best, _ = dec.choose(cands, fp32, 5.0)
    assert best is cands[2] and cands[1].metrics["rejected"] == "perplexity +20.00% > 5%"


@pytest.mark.parametrize("argv, needle", [
    (["--scheme", "nf4"], "int8 or int4"),
    (["--scheme", "int8", "--min-sqnr", "20"], "--min-sqnr: does not apply to a causal LM"),
    (["--scheme", "int4", "--group-size", "48"], "--group-size 48"),
    (["--scheme", "int8", "--backend", "onnxruntime"], "--backend onnxruntime"),
])
def test_decoder_quantize_refuses_what_it_cannot_do(tmp_path, capsys, argv, needle):
    model, _ = _bpe_llama_and_chat(tmp_path)
    capsys.readouterr()
    assert _exit_code(["quantize", "--model", str(model), "--output", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "o").exists()


def test_llamacpp_flags_refused_for_a_classifier(tmp_path, capsys, tiny_bert_dir):
    argv = ["quantize", "--model", str(tiny_bert_dir), "--output", str(tmp_path / "o"), "--backend", "llama.cpp"]
    assert _exit_code(argv) == 2 and "applies to causal LMs" in capsys.readouterr().err


def test_generate_runs_a_quantized_decoder_on_its_kernels(tmp_path, capsys):
    from slimtune.compress.quant.storage import load_quantized
    from slimtune.runtime.generate import SamplingConfig, generate_text, load_for_generation

    model, chat = _bpe_llama_and_chat(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model), "--scheme", "int4", "--backend", "torch", "--group-size", "32",
                 "--output", str(out), "--seq-len", "16", "--new-tokens", "4", "--repeats", "1",
                 "--max-perplexity-increase", "1000"]) == 0
    lm, tok, info = load_for_generation(out)
    assert info["kernels"] > 0 and any(isinstance(m, Int4KernelLinear) for m in lm.modules())
    ref = load_quantized(out, dequantize=True)  # the same codes decoded to float: the reference
    cfg = SamplingConfig(max_new_tokens=6)
    want = generate_text(ref, tok, ["movie great"], cfg)[0]
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "movie great", "--max-new-tokens", "6", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == want.text.strip()


@needs_llamacpp
def test_generate_runs_a_gguf_folder_with_llamacpp(tmp_path, capsys):
    from slimtune.runtime.generate import SamplingConfig, prompt_ids
    from slimtune.runtime.gguf_folder import is_gguf_folder, open_gguf_folder

    model, _ = _bpe_llama_and_chat(tmp_path)
    out = tmp_path / "g"
    assert main(["quantize", "--model", str(model), "--scheme", "int8", "--backend", "llama.cpp",
                 "--output", str(out), "--seq-len", "16", "--new-tokens", "4", "--repeats", "1"]) == 0
    assert is_gguf_folder(out)
    lm, tok = open_gguf_folder(out, n_ctx=256)
    want = lm.generate(prompt_ids(tok, "movie great"), SamplingConfig(max_new_tokens=6))[0]
    lm.close()
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "movie great", "--max-new-tokens", "6", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == want.text.strip()


@pytest.mark.parametrize("backend", ["torch", pytest.param("llama.cpp", marks=needs_llamacpp)])
def test_evaluate_scores_a_quantized_decoder_as_quantize_did(tmp_path, capsys, backend):
    model, chat = _bpe_llama_and_chat(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model), "--scheme", "int8", "--backend", backend, "--eval", str(chat),
                 "--output", str(out), "--seq-len", "16", "--new-tokens", "4", "--repeats", "1",
                 "--max-perplexity-increase", "1000"]) == 0
    chosen = json.loads((out / "metrics.json").read_text())["perplexity"]
    assert main(["evaluate", "--model", str(out), "--eval", str(chat), "--output", str(tmp_path / "e.json")]) == 0
    m = json.loads((tmp_path / "e.json").read_text())
    assert m["answer_perplexity"] == pytest.approx(chosen, rel=1e-4)
    assert "exact_match" in m
    weights = [f for f in out.iterdir() if f.suffix in (".gguf", ".safetensors")]
    assert m["size_mb"] == pytest.approx(sum(f.stat().st_size for f in weights) / 1e6) and m["size_mb"] > 0


@needs_llamacpp
def test_decoder_int4_with_training_data_builds_gptq_q4_0_with_tuned_norms(tmp_path):
    """--train gives GPTQ Q4_0 (instead of plain rounding) plus norm tuning: the codes stay Q4_0, the
    norms move, and the GPTQ rounding's layer error is below round-to-nearest's."""
    import gguf
    import numpy as np

    model, chat = _bpe_llama_and_chat(tmp_path)
    out = tmp_path / "q4g"
    rc = main(["quantize", "--model", str(model), "--scheme", "int4", "--backend", "llama.cpp", "--eval", str(chat),
               "--train", str(chat), "--norm-steps", "3", "--output", str(out), "--seq-len", "16", "--new-tokens", "4",
               "--repeats", "1", "--max-perplexity-increase", "1000"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["candidates"]) == {"llama.cpp-q4_0-gptq", "llama.cpp-q4_k_m"}
    g = m["candidates"]["llama.cpp-q4_0-gptq"]["info"]
    assert g["tensor_types"]["q4_0"] == 14 and g["norm_tuning"]["steps"] == 3
    assert g["gptq"]["mean_output_error"]["gptq"] < g["gptq"]["mean_output_error"]["round_to_nearest"]
    if m["backend_candidate"] == "llama.cpp-q4_0-gptq":
        r = gguf.GGUFReader(out / "model.gguf")
        norms = [t for t in r.tensors if t.name.endswith("attn_norm.weight")]
        src = {k: v for k, v in load_file(str(model / "model.safetensors")).items()
               if k.endswith("input_layernorm.weight")}
        assert len(norms) == len(src) == 2
        assert not all(np.allclose(np.asarray(t.data), src[f"model.layers.{t.name.split('.')[1]}.input_layernorm.weight"].numpy())
                       for t in norms)  # the gains were tuned


def test_decoder_norm_steps_without_data_is_refused(tmp_path, capsys):
    model, chat = _bpe_llama_and_chat(tmp_path)
    rc = _exit_code(["quantize", "--model", str(model), "--scheme", "int4", "--eval", str(chat), "--norm-steps", "5",
                     "--output", str(tmp_path / "q")])
    assert rc == 2 and "--norm-steps" in capsys.readouterr().err


def test_decoder_quantize_takes_a_model_alias(tmp_path, monkeypatch):
    """``--model smollm2`` (an alias, not a folder) is quantized from the alias's local folder (it
    once failed after loading the weights, sizing a folder named ``smollm2``)."""
    from slimtune.models import loading

    model, chat = _bpe_llama_and_chat(tmp_path)
    monkeypatch.setitem(loading.ALIASES, "smollm2", lambda: model)  # the alias, pointed at the tiny Llama
    monkeypatch.setitem(loading._CHEAP_CHECKS, "smollm2", lambda: model)
    monkeypatch.chdir(tmp_path)  # no folder named like the alias here
    out = tmp_path / "q"
    assert main(["quantize", "--model", "smollm2", "--scheme", "int8", "--backend", "torch", "--eval", str(chat),
                 "--output", str(out), "--seq-len", "16", "--new-tokens", "4", "--repeats", "1"]) == 0
    fp32 = json.loads((out / "metrics.json").read_text())["fp32"]
    assert fp32["size_mb"] == pytest.approx((model / "model.safetensors").stat().st_size / 1e6)
