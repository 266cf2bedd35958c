"""GPTQ onto llama.cpp's Q4_0 grid: the bytes match the ``gguf`` reference format, the rounding beats
round-to-nearest on the layer's output, and llama.cpp runs the written file like torch does."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers_export import assert_llamacpp_logits_close, make_bpe_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune.compress.quant.gptq import Q4_0_BLOCK, gptq_q4_0, gptq_quantize_decoder, pack_q4_0
from slimtune.export.gguf import write_gguf
from slimtune.runtime.llamacpp import llamacpp_available

Q4_0 = gguf.GGMLQuantizationType.Q4_0
needs_llamacpp = pytest.mark.skipif(not llamacpp_available(),
                                    reason="llama-cpp-python is not installed (pip install slimtune[llamacpp])")


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3


def test_identity_hessian_is_the_reference_q4_0() -> None:
    """With H = I no error moves between columns: the codes are gguf's own Q4_0 rounding."""
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    q, codes, scales = gptq_q4_0(w, torch.eye(96))
    ours = pack_q4_0(codes, scales)
    ref = gguf.quants.quantize(w.numpy(), Q4_0)
    assert ours.shape == ref.shape == (48, 96 // Q4_0_BLOCK * 18)
    # gguf rounds with the f32 scale, we with the stored f16 one: a rare code differs by one step
    assert (ours == ref).mean() > 0.99
    deq_ours, deq_ref = gguf.quants.dequantize(ours, Q4_0), gguf.quants.dequantize(ref, Q4_0)
    step = np.repeat(np.abs(scales.numpy()), Q4_0_BLOCK, axis=1)
    assert np.all(np.abs(deq_ours - deq_ref) <= step * 1.0001)
    assert np.array_equal(deq_ours, q.numpy())  # the returned weight is exactly what the file holds


def test_gptq_beats_rounding_on_the_layer_output() -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    x = _correlated_inputs(4000, 128)
    q, codes, scales = gptq_q4_0(w, x.double().T @ x.double())
    rtn = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q4_0), Q4_0))
    ref = x @ w.T
    err_gptq = float((x @ q.T - ref).norm() / ref.norm())
    err_rtn = float((x @ rtn.T - ref).norm() / ref.norm())
    assert err_gptq < 0.85 * err_rtn, (err_gptq, err_rtn)
    assert np.array_equal(gguf.quants.dequantize(pack_q4_0(codes, scales), Q4_0), q.numpy())
    assert codes.min() >= 0 and codes.max() <= 15


def test_rows_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="32-value blocks"):
        gptq_q4_0(torch.randn(4, 40), torch.eye(40))


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bpe_llama(tmp_path_factory.mktemp("gptq") / "llama", hidden=64, intermediate=128)


def _calib(tok: object, n: int = 12) -> list[list[int]]:
    from helpers_export import TEXTS

    return [tok(t)["input_ids"] for t in (TEXTS * 3)[:n]]


def test_decoder_gptq_writes_q4_0_grid_weights_and_lowers_layer_error(bpe_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(bpe_llama).eval()
    tok = AutoTokenizer.from_pretrained(bpe_llama)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    r = gptq_quantize_decoder(model, _calib(tok))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n in before
               and ".layers." in f".{n}"}
    assert set(r["codes"]) == {n + ".weight" for n in linears} and len(linears) == 2 * 7
    for n, m in linears.items():
        codes, scales = r["codes"][n + ".weight"]
        assert np.array_equal(gguf.quants.dequantize(pack_q4_0(codes, scales), Q4_0), m.weight.detach().numpy())
        assert not torch.equal(m.weight, before[n])
    assert torch.equal(model.lm_head.weight, before["lm_head"])  # the (tied) output projection is not touched
    rtn, gptq = np.mean([v for v in r["output_error"].values()], axis=0)
    assert gptq < rtn, r["output_error"]


@needs_llamacpp
def test_llama_cpp_runs_the_gptq_codes_like_torch(bpe_llama: Path, tmp_path: Path) -> None:
    """Rows of q/k are permuted for llama.cpp's RoPE with their codes: logits agree with torch's."""

    model = AutoModelForCausalLM.from_pretrained(bpe_llama).eval()
    tok = AutoTokenizer.from_pretrained(bpe_llama)
    r = gptq_quantize_decoder(model, _calib(tok))
    pre = {k: ("q4_0", pack_q4_0(c, s)) for k, (c, s) in r["codes"].items()}
    info = write_gguf(model, tok, tmp_path / "m.gguf", quant="q4_0", embedding_quant="f32", prequantized=pre)
    assert info["tensor_types"]["q4_0"] == 14
    ids = tok("The quick brown fox jumps over the lazy dog. Is 12 + 30 = 42?")["input_ids"]
    assert_llamacpp_logits_close(tmp_path / "m.gguf", model, ids)
