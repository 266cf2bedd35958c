"""A Llama decoder as one GGUF file for llama.cpp, written with the ``gguf`` package.

- Hyper-parameters from ``config.json`` (any depth, FFN width, head count, KV groups, head size,
  vocabulary; pruned models have odd shapes), RoPE base and linear scaling.
- Tensor names from ``gguf``'s own HF -> GGUF map (``blk.N.attn_q.weight``...). The query and
  key projections are permuted from HF's rotate-half RoPE layout to llama.cpp's interleaved
  pairs (per head; keys per KV head). Tied embeddings are stored once (``token_embd``; llama.cpp
  reuses it as the output projection when ``output.weight`` is absent).
- Weight types: norms are F32; every matrix gets ``quant`` (``gguf.quants.quantize``), the
  token embedding and the output projection ``embedding_quant``. A quantized type packs each row in blocks of 32 (or 256)
  values: a matrix whose rows are not whole blocks falls back to F16, and the fallbacks are
  returned (export.json lists them).
- The tokenizer and chat template: :mod:`slimtune.export.gguf_vocab`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from slimtune.export.gguf_vocab import add_vocab, build_vocab
from slimtune.models.loading import ModelError

QTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1, "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1, "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")
FALLBACK = "f16"
GGUF_FILE = "model.gguf"


def embedding_type(quant: str, embedding_quant: str) -> str:
    """The token embedding's type: ``embedding_quant``, or for ``auto`` q8_0 under a 4/5-bit ``quant``."""
    if embedding_quant != "auto":
        return embedding_quant
    return "q8_0" if quant in LOW_BIT else quant


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from HF's rotate-half layout to llama.cpp's interleaved pairs, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def add_hparams(writer: gguf.GGUFWriter, config: Any, quant: str, name: str) -> None:
    """The ``llama.*`` keys of ``config`` (and general.name / file_type)."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    theta, rope = _rope(config)
    writer.add_rope_freq_base(theta)
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def encode(data: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """``data`` (float32) stored as ``kind``, or as F16 when its rows are not whole blocks; (array, type used)."""
    qtype = QTYPES[kind]
    if kind == "f32":
        return data, kind
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.ndim < 2 or data.shape[-1] % block:
        kind, qtype = FALLBACK, QTYPES[FALLBACK]
    return gguf.quants.quantize(data, qtype), kind


def _tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) to store: tied output projections once, rotary buffers never."""
    cfg = model.config
    sd = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = []
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq") or (tied and k == "lm_head.weight"):
            continue
        out.append((k, v.detach().to(torch.float32)))
    return out


def gguf_tensor(hf_name: str, w: torch.Tensor, config: Any, names: Any) -> tuple[str, torch.Tensor]:
    """The GGUF name of an HF Llama tensor and its data in llama.cpp's layout."""
    new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ModelError(f"tensor {hf_name}: no GGUF name in the llama architecture")
    heads = int(config.num_attention_heads)
    if hf_name.endswith("self_attn.q_proj.weight"):
        w = permute_rope(w, heads)
    elif hf_name.endswith("self_attn.k_proj.weight"):
        w = permute_rope(w, int(getattr(config, "num_key_value_heads", None) or heads))
    return new, w


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: str | Path, *, quant: str = "f16",
               embedding_quant: str = "auto", pre_tokenizer: str | None = None, name: str = "model",
               prequantized: dict[str, tuple[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Write a ``LlamaForCausalLM`` and its tokenizer to one GGUF file.

    Args:
        model: the plain ``LlamaForCausalLM`` (float weights).
        tokenizer: its byte-level BPE fast tokenizer (chat template included if it has one).
        path: the ``.gguf`` file to write.
        quant: weight type of the matrices (see :data:`QTYPES`).
        embedding_quant: the token embedding's type (``auto``: :func:`embedding_type`).
        pre_tokenizer: llama.cpp pre-tokenizer name (None: read from the tokenizer).
        name: ``general.name``.
        prequantized: HF weight name -> (type, raw GGUF blocks of shape (rows, bytes per row), in HF's
            row order), written as given instead of ``quant`` (GPTQ's Q4_0 codes:
            :mod:`slimtune.compress.quant.gptq`).

    Returns:
        What was written: types per tensor kind, block fallbacks, tokenizer keys, seconds.
    """
    t0 = time.perf_counter()
    cfg = model.config
    vocab = build_vocab(tokenizer, cfg, int(model.get_input_embeddings().weight.shape[0]), pre_tokenizer)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_hparams(writer, cfg, quant, name)
    add_vocab(writer, vocab)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(cfg.num_hidden_layers))
    emb = embedding_type(quant, embedding_quant)
    types: dict[str, int] = {}
    fallbacks: dict[str, str] = {}
    pre = prequantized or {}
    for hf_name, w in _tensors(model):
        if hf_name in pre:  # the rows permute like the weight's (permute_rope moves whole rows)
            kind, blocks = pre[hf_name]
            new, raw = gguf_tensor(hf_name, torch.from_numpy(blocks), cfg, names)
            writer.add_tensor(new, raw.numpy(), raw_dtype=QTYPES[kind])
            types[kind] = types.get(kind, 0) + 1
            continue
        new, w = gguf_tensor(hf_name, w, cfg, names)
        want = "f32" if w.ndim < 2 else emb if new in ("token_embd.weight", "output.weight") else quant
        data, used = encode(w.numpy(), want)
        if used != want:
            fallbacks[new] = f"{want} -> {used} (rows of {w.shape[-1]} values are not whole {want} blocks)"
        types[used] = types.get(used, 0) + 1
        writer.add_tensor(new, data, raw_dtype=QTYPES[used] if used != "f32" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": Path(path).name, "quant": quant, "embedding_quant": emb, "tensor_types": types,
            "fallbacks": fallbacks, "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "tokenizer": {"model": "gpt2", "pre": vocab.pre, "tokens": len(vocab.tokens), "merges": len(vocab.merges),
                          "special_ids": vocab.special_ids, "add_bos": vocab.add_bos, "add_eos": vocab.add_eos,
                          "chat_template": vocab.chat_template is not None},
            "write_seconds": round(time.perf_counter() - t0, 2)}
