"""Numerics (SQNR thresholds, torchao style), bit packing, the handler registry, and the
save/load round trip of quantized models. Tiny random models only; fast."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from tiny import llama_lm
from tiny import quant_bert as tiny_bert
from torch import nn

from slimtune.compress.quant.api import (
    Int4WeightConfig,
    Int8WeightConfig,
    KMeansConfig,
    NF4Config,
    QuantizedEmbedding,
    QuantizedLinear,
    decode_weight,
    dequantize_,
    encode_weight,
    quantize_,
    quantized_modules,
    register_quantize_handler,
)
from slimtune.compress.quant.codebook import NF4_CODE
from slimtune.compress.quant.linear import pack_bits, qrange, sqnr_db, unpack_bits
from slimtune.compress.quant.storage import (
    QuantizedFormatError,
    export_dequantized,
    load_quantized,
    read_sidecar,
    save_quantized,
)


def _weight(rows: int = 64, cols: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows of different scale, as real layers have: per-channel scales must pay off.
    return torch.randn(rows, cols, generator=g) * 0.05 * torch.linspace(0.2, 3.0, rows)[:, None]


# ---------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_bits_roundtrip_exact(bits: int, n: int) -> None:
    codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-n * bits // 8)  # ceil: no wasted bytes
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_int4_is_two_codes_per_byte_high_nibble_first() -> None:
    packed = pack_bits(torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x12, 0xF0, 0x70]


def test_int4_storage_is_half_a_byte_per_weight() -> None:
    w = _weight(32, 256)
    meta, t = encode_weight(w, Int4WeightConfig(granularity="channel", symmetric=True))
    assert t["qdata"].numel() == w.numel() // 2
    assert set(t) == {"qdata", "scale"}  # symmetric: no zero point stored


# ---------------------------------------------------------------------------------- numerics

# (config, minimum weight SQNR in dB) for the weight above; Gaussian-theory values minus margin
# (int8 ~ 6 dB/bit; 4-bit Lloyd-Max optimum for a Gaussian is ~20 dB).
SQNR_FLOORS = [
    (Int8WeightConfig(), 40.0),
    (Int8WeightConfig(granularity="tensor"), 30.0),
    (Int8WeightConfig(granularity="group", group_size=32, symmetric=False), 40.0),
    (Int4WeightConfig(), 19.0),
    (Int4WeightConfig(granularity="channel"), 17.0),
    (Int4WeightConfig(symmetric=True), 18.0),
    (NF4Config(), 18.0),
    (NF4Config(block_size=32), 19.0),
    (KMeansConfig(), 18.5),
    (KMeansConfig(bits=3), 13.0),
    (KMeansConfig(bits=8, granularity="tensor"), 30.0),
]


@pytest.mark.parametrize(("cfg", "floor"), SQNR_FLOORS, ids=lambda x: repr(x)[:60])
def test_weight_sqnr_floor(cfg, floor: float) -> None:
    w = _weight()
    meta, t = encode_weight(w, cfg)
    approx = decode_weight(meta, t)
    assert approx.shape == w.shape and approx.dtype == w.dtype
    assert sqnr_db(w, approx) >= floor


def test_finer_granularity_is_more_accurate() -> None:
    w = _weight()
    s = {g: sqnr_db(w, decode_weight(*encode_weight(w, Int4WeightConfig(granularity=g, group_size=16))))
         for g in ("tensor", "channel", "group")}
    assert s["tensor"] + 3 < s["channel"] < s["group"]


def test_codes_stay_in_range_and_zero_is_exact() -> None:
    w = _weight()
    w[:, :5] = 0.0  # pruned weights / padding rows must stay exactly zero
    for bits, cfg in ((8, Int8WeightConfig(symmetric=False)), (4, Int4WeightConfig())):
        meta, t = encode_weight(w, cfg)
        back = decode_weight(meta, t)
        assert torch.all(back[:, :5] == 0)
        if bits == 8:
            lo, hi = qrange(8)
            assert lo <= int(t["qdata"].min()) and int(t["qdata"].max()) <= hi


def test_nf4_codes_are_the_qlora_table() -> None:
    assert NF4_CODE.numel() == 16 and NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    w = torch.tensor([[0.0, 1.0, -1.0, 0.5]]).repeat(1, 16)  # one block of 64
    back = decode_weight(*encode_weight(w, NF4Config()))
    assert back[0, 0] == 0 and back[0, 1] == 1 and back[0, 2] == -1  # absmax and zero are exact


def test_kmeans_uses_at_most_2_pow_bits_values_per_channel() -> None:
    w = _weight()
    back = decode_weight(*encode_weight(w, KMeansConfig(bits=3)))
    assert max(len(torch.unique(r)) for r in back) <= 8


@pytest.mark.parametrize(("cfg", "floor"), [(Int8WeightConfig(), 30.0), (Int4WeightConfig(), 12.0),
                                            (NF4Config(), 12.0), (KMeansConfig(), 12.0)],
                         ids=["int8", "int4", "nf4", "kmeans"])
def test_model_logits_sqnr(cfg, floor: float) -> None:
    model = tiny_bert()
    ids = torch.randint(5, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.bert(input_ids=ids).last_hidden_state
        q = quantize_(copy.deepcopy(model), cfg)
        got = q.bert(input_ids=ids).last_hidden_state
    assert sqnr_db(ref, got) >= floor
    kinds = {type(m) for m in quantized_modules(q).values()}
    assert kinds == {QuantizedLinear, QuantizedEmbedding}


def test_embeddings_can_be_left_in_float() -> None:
    q = quantize_(tiny_bert(), Int8WeightConfig(include_embeddings=False))
    assert isinstance(q.bert.embeddings.word_embeddings, nn.Embedding)
    assert isinstance(q.bert.encoder.layer[0].attention.self.query, QuantizedLinear)


def test_skip_patterns_leave_modules_in_float() -> None:
    q = quantize_(tiny_bert(), Int4WeightConfig(skip=("classifier", "*.pooler.*")))
    assert isinstance(q.classifier, nn.Linear)
    assert isinstance(q.bert.pooler.dense, nn.Linear)


def test_group_size_error_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"bert\.embeddings\.word_embeddings: group_size 48 does not divide"):
        quantize_(tiny_bert(), Int4WeightConfig(group_size=48))


def test_bad_config_values_fail_early() -> None:
    with pytest.raises(ValueError, match="granularity"):
        Int8WeightConfig(granularity="row")
    with pytest.raises(ValueError, match="bits"):
        KMeansConfig(bits=9)


def test_int8_embedding_row_decode_equals_full_decode() -> None:
    emb = nn.Embedding(50, 16)
    q = quantize_(nn.Sequential(emb), Int8WeightConfig())[0]
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    assert torch.equal(q(ids), torch.nn.functional.embedding(ids, q.dequantized_weight()))


def test_registry_takes_new_configs() -> None:
    @dataclass
    class HalfConfig:
        pass

    @register_quantize_handler(HalfConfig)
    def _half(module: nn.Module, cfg: HalfConfig) -> nn.Module:
        return module.half()

    model = quantize_(nn.Sequential(nn.Linear(4, 4)), HalfConfig(), filter_fn=lambda m, n: True)
    assert model[0].weight.dtype == torch.float16
    with pytest.raises(TypeError, match="no quantize handler"):
        quantize_(model, object())


def test_dequantize_restores_plain_modules() -> None:
    q = quantize_(tiny_bert(), NF4Config())
    ids = torch.randint(5, 64, (2, 8))
    with torch.inference_mode():
        before = q(input_ids=ids).logits
        plain = dequantize_(q)
        after = plain(input_ids=ids).logits
    assert not quantized_modules(plain)
    assert torch.equal(before, after)


# ---------------------------------------------------------------------------------- storage


@pytest.mark.parametrize("cfg", [Int8WeightConfig(), Int8WeightConfig(granularity="tensor", symmetric=False),
                                 Int4WeightConfig(), Int4WeightConfig(granularity="channel", symmetric=True),
                                 NF4Config(), KMeansConfig(bits=3), KMeansConfig(granularity="tensor")],
                         ids=lambda c: repr(c)[:50])
def test_save_load_roundtrip_is_exact(tmp_path, cfg) -> None:
    q = quantize_(tiny_bert(), cfg)
    save_quantized(q, tmp_path, cfg)
    r = load_quantized(tmp_path)
    a, b = quantized_modules(q), quantized_modules(r)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].qmeta == {k: v for k, v in b[name].qmeta.items() if k in a[name].qmeta}
        for k, t in a[name].qtensors().items():
            assert torch.equal(t, b[name].qtensors()[k]), f"{name}.{k}"
    ids = torch.randint(5, 64, (3, 10))
    with torch.inference_mode():
        assert torch.equal(q(input_ids=ids).logits, r(input_ids=ids).logits)


def test_sidecar_describes_every_tensor(tmp_path) -> None:
    cfg = Int4WeightConfig(group_size=16)
    q = quantize_(tiny_bert(), cfg)
    save_quantized(q, tmp_path, cfg)
    side = json.loads((tmp_path / "quantization.json").read_text())
    assert side["scheme"] == "int4" and side["granularity"] == "group" and side["group_size"] == 16
    t = side["tensors"]["bert.encoder.layer.0.attention.self.query.weight"]
    assert t == {"kind": "affine", "bits": 4, "symmetric": False, "granularity": "group",
                 "group_size": 16, "shape": [64, 64], "dtype": "float32", "module": "linear"}
    assert side["tensors"]["bert.embeddings.word_embeddings.weight"]["module"] == "embedding"
    assert read_sidecar(tmp_path)["version"] == 1


def test_compact_file_is_small(tmp_path) -> None:
    model = tiny_bert(vocab_size=64, hidden=128)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    for cfg, ratio in ((Int8WeightConfig(), 3.5), (Int4WeightConfig(), 5.0)):
        d = tmp_path / type(cfg).__name__
        save_quantized(quantize_(copy.deepcopy(model), cfg), d, cfg)
        assert fp32_bytes / (d / "quantized.safetensors").stat().st_size >= ratio


def test_tied_embeddings_roundtrip(tmp_path) -> None:
    model = llama_lm(hidden=64, max_positions=2048, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    q = quantize_(model.eval(), Int4WeightConfig())
    assert isinstance(q.lm_head, nn.Linear)  # tied to the input embedding: left in float
    save_quantized(q, tmp_path, Int4WeightConfig())
    r = load_quantized(tmp_path)
    ids = torch.randint(0, 100, (2, 9))
    with torch.inference_mode():
        assert torch.equal(q(input_ids=ids).logits, r(input_ids=ids).logits)
    assert r.lm_head.weight is r.model.embed_tokens.weight


def test_dequantized_export_loads_in_plain_transformers(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    q = quantize_(tiny_bert(), KMeansConfig())
    export_dequantized(q, tmp_path)
    assert not (tmp_path / "quantization.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 64, (2, 8))
    with torch.inference_mode():
        torch.testing.assert_close(plain(input_ids=ids).logits, q(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(QuantizedFormatError, match="quantization.json: not found"):
        load_quantized(tmp_path)
    (tmp_path / "quantization.json").write_text("{not json")
    with pytest.raises(QuantizedFormatError, match=r"quantization.json: invalid JSON"):
        load_quantized(tmp_path)
    (tmp_path / "quantization.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(QuantizedFormatError, match="format is 'other'"):
        load_quantized(tmp_path)
    cfg = Int8WeightConfig()
    save_quantized(quantize_(tiny_bert(), cfg), tmp_path, cfg)
    (tmp_path / "quantized.safetensors").unlink()
    with pytest.raises(QuantizedFormatError, match="quantized.safetensors: not found"):
        load_quantized(tmp_path)


# ---------------------------------------------------------------------------------- QAT


def test_fake_quant_forward_equals_the_quantized_model() -> None:
    from slimtune.compress.quant.qat import FakeQuantMethod

    cfg = Int4WeightConfig(group_size=16)
    ids = torch.randint(5, 64, (2, 10))
    fq = FakeQuantMethod().apply(tiny_bert().eval(), cfg)
    q = quantize_(tiny_bert(), cfg)
    with torch.inference_mode():
        assert torch.equal(fq(input_ids=ids).logits, q(input_ids=ids).logits)
    # Straight-through: gradients reach the latent float weights.
    fq(input_ids=ids).logits.sum().backward()
    assert fq.bert.encoder.layer[0].attention.self.query.parametrizations.weight.original.grad is not None


def test_recover_trains_through_the_loop_and_leaves_plain_modules() -> None:
    from torch.nn.utils import parametrize

    from slimtune.compress.quant.qat import recover_
    from slimtune.data.datasets import TokenizedData

    g = torch.Generator().manual_seed(0)
    ids = [[2, *torch.randint(5, 30, (8,), generator=g).tolist(), 3] for _ in range(32)]
    data = TokenizedData(ids, None, [int(7 in x) for x in ids], 0)
    model = tiny_bert(layers=1)
    before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    summary = recover_(model, Int4WeightConfig(), data, steps=3, lr=1e-3, batch_size=8)
    assert summary["steps"] == 3
    lin = model.bert.encoder.layer[0].attention.self.query
    assert not parametrize.is_parametrized(lin) and type(lin) is nn.Linear
    assert not torch.equal(lin.weight, before)
