"""ONNX folders for onnxruntime: decoders with past key values, and encoder classifiers.

Decoders: ``torch.onnx.export`` (TorchScript tracer by default, or dynamo) of a wrapper with flat inputs, so the graph
has the names of :mod:`slimtune.runtime.onnx_decoder` (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.<i>.key|value`` -> ``logits``, ``present.<i>.key|value``)
and dynamic batch, sequence, past and total lengths; one graph serves the prompt (past length
0) and every decoding step. Attention is exported in its eager form (a plain masked softmax
that onnxruntime runs for any length); the model's own attention setting is restored after.

Encoders: the quantize stage's exporter (:func:`slimtune.compress.quant.onnx.write_onnx_folder`,
fp32 with onnxruntime's BERT fusions, its own parity check), so ``slimtune export --format
onnx`` of a classifier is the same folder ``slimtune quantize --scheme fp32`` serves.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim
from transformers import DynamicCache

from slimtune.compress.quant.onnx import quiet, write_onnx_folder
from slimtune.runtime.onnx_decoder import past_names, present_names

ONNX_FILE = "model.onnx"


class DecoderWithPast(torch.nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` for export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = int(model.config.num_hidden_layers)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 / 4

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_kw: cache})
        new = getattr(out, "cache", None) or out.past_key_values
        flat: list[torch.Tensor] = []
        for layer in new.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention inside the block (SDPA's export adds shape guards)."""
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def kv_shape(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of a decoder config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return kv, int(getattr(config, "head_dim", None) or config.hidden_size // heads)


def _example(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Batch 2, 3 new tokens after a past of 4 (sizes 0 and 1 would be specialised by the tracer)."""
    n_layers = int(model.config.num_hidden_layers)
    kv, head_dim = kv_shape(model.config)
    g = torch.Generator().manual_seed(0)
    b, s, p = 2, 3, 4
    ids = torch.randint(0, int(model.config.vocab_size), (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s)[None].expand(b, s)
    return (ids, mask, pos, *(torch.randn(b, kv, p, head_dim, generator=g) for _ in range(2 * n_layers)))


def export_decoder(model: torch.nn.Module, path: str | os.PathLike, opset: int = 18,
                   exporter: str = "legacy") -> dict[str, Any]:
    """Export a causal LM with past key values to ``path`` (one file; weights beside it past 1.8 GB).

    Every axis but heads, head size and vocabulary is dynamic. ``exporter``: ``legacy`` (the
    TorchScript tracer: seconds) or ``dynamo`` (``torch.export``: minutes on a small CPU); both
    are checked the same way (prefill and decoding steps against transformers).
    """
    model.eval()
    n_layers = int(model.config.num_hidden_layers)
    kv, head_dim = kv_shape(model.config)
    example = _example(model)
    names_in = ["input_ids", "attention_mask", "position_ids", *past_names(n_layers)]
    names_out = ["logits", *present_names(n_layers)]
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    t0 = time.perf_counter()
    with torch.no_grad(), eager_attention(model), quiet(), contextlib.redirect_stdout(None):
        wrapper = DecoderWithPast(model).eval()
        if exporter == "legacy":
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                    "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
            axes.update({n: {0: "batch", 2: "past_sequence"} for n in past_names(n_layers)})
            axes.update({n: {0: "batch", 2: "total_sequence"} for n in present_names(n_layers)})
            # No constant folding: it would store a tied output projection twice (the embedding and its
            # transpose, +113 MB for SmolLM2); onnxruntime folds the Transpose when it loads the graph.
            torch.onnx.export(wrapper, example, str(path), dynamo=False, input_names=names_in, output_names=names_out,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=False)
        elif exporter == "dynamo":
            batch, seq, past_len, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
            shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
                      tuple({0: batch, 2: past_len} for _ in range(2 * n_layers)))
            torch.onnx.export(wrapper, example, str(path), dynamo=True, input_names=names_in, output_names=names_out,
                              dynamic_shapes=shapes, opset_version=opset, external_data=size > 1_800_000_000,
                              verbose=False)
        else:
            raise ValueError(f"exporter must be legacy or dynamo, got {exporter!r}")
    return {"exporter": exporter, "opset": opset, "attention": "eager", "layers": n_layers, "kv_heads": kv,
            "head_dim": head_dim, "inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.<i>.key|value"],
            "outputs": ["logits", "present.<i>.key|value"], "export_seconds": round(time.perf_counter() - t0, 2)}


def write_decoder_folder(model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike, opset: int = 18,
                         exporter: str = "legacy") -> dict[str, Any]:
    """``out/model.onnx`` + config.json, generation_config.json and the tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = export_decoder(model, out / ONNX_FILE, opset, exporter)
    model.config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return info


def write_encoder_folder(model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike) -> dict[str, Any]:
    """The quantize stage's fp32 ONNX folder of a sequence classifier (fused, parity-checked)."""
    return write_onnx_folder(model, out, tokenizer, optimize=True, quantize=False)
