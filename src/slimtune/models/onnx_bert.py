"""Rebuild a trainable BERT encoder from an ONNX export, checked against ONNX Runtime.

Some encoders ship only as ONNX (the packaged 3-layer paraphrase-MiniLM-L3-v2 student is
one). Training needs the PyTorch module back. The legacy ``torch.onnx`` exporter keeps the
parameter names of biases and LayerNorms, but stores each linear weight as an anonymous,
transposed ``onnx::MatMul_N`` initializer. Each such MatMul feeds an ``Add`` whose other input
is the named bias, so the weight's name is the bias's with ``.bias`` → ``.weight``: the mapping
follows the graph and not the order of the initializers.

The attention head count is not stored in any weight. Each candidate (every head size ≥ 8 that
divides the width) is tried, and the one whose last hidden state is closest to ONNX Runtime's on
a probe batch is kept, if within ``atol``. A conversion that matches no candidate is refused, so
a wrong mapping cannot pass silently.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from slimtune.io import atomic_dir

_PREFIXES = ("model.0.auto_model.", "0.auto_model.", "auto_model.", "bert.", "model.")


class OnnxImportError(ValueError):
    """The ONNX graph is not a BERT encoder this importer understands."""


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def bert_state_from_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``BertModel`` state dict held in a BERT ONNX graph (no pooler: exports often drop it).

    Raises:
        OnnxImportError: the graph has no BERT embeddings, or a MatMul weight has no named bias.
    """
    import onnx  # optional dependency (the quant extra)
    from onnx import numpy_helper  # optional dependency (the quant extra)

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # the exporter shares equal tensors (e.g. zero biases) through Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
    state: dict[str, torch.Tensor] = {}
    for name, t in inits.items():
        key = _strip(name)
        if key.startswith(("embeddings.", "encoder.")):
            state[key] = torch.from_numpy(t.copy())
    for node in graph.node:  # anonymous linear weights: MatMul(x, W[in, out]) -> Add(., bias)
        if node.op_type != "MatMul" or node.input[1] not in inits or _strip(node.input[1]) in state:
            continue
        bias = [i for n in consumers[node.output[0]] if n.op_type == "Add" for i in n.input
                if i in inits and i.endswith(".bias")]
        if len(bias) != 1:
            raise OnnxImportError(f"{path}: MatMul weight {node.input[1]} is not followed by one named bias")
        w = inits[node.input[1]]
        state[_strip(bias[0])[: -len(".bias")] + ".weight"] = torch.from_numpy(w.T.copy())  # (out, in)
    if "embeddings.word_embeddings.weight" not in state:
        raise OnnxImportError(f"{path}: no BERT embeddings (embeddings.word_embeddings.weight) in the graph")
    return state


def _config_from_state(state: dict[str, torch.Tensor], heads: int) -> Any:

    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
                      layer_norm_eps=1e-12, hidden_act="gelu")


def _onnx_hidden(path: Path, ids: np.ndarray, mask: np.ndarray, hidden: int) -> np.ndarray:
    """The graph's (B, S, hidden) output on a probe batch: its last hidden state."""
    import onnxruntime as ort  # optional dependency (the quant extra)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    feed = {k: v for k, v in feed.items() if k in names}
    for out in sess.run(None, feed):
        if out.shape == (*ids.shape, hidden):
            return out
    raise OnnxImportError(f"{path}: no (batch, seq, {hidden}) output to check the conversion against")


def bert_from_onnx(path: str | Path, *, atol: float = 1e-4) -> Any:
    """A ``transformers.BertModel`` with the ONNX graph's weights, checked against ONNX Runtime.

    Args:
        path: the ``.onnx`` file (a BERT encoder exported by ``torch.onnx``).
        atol: largest allowed |difference| of the last hidden state on the probe batch.

    Raises:
        OnnxImportError: the graph is not understood, or no head count reproduces its output.
    """
    path = Path(path)
    state = bert_state_from_onnx(path)
    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    gen = np.random.default_rng(0)
    ids = gen.integers(1000 if vocab > 2000 else 1, vocab, size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # a padded row: the mask path is checked too
    ref = _onnx_hidden(path, ids, mask, hidden)
    best: tuple[float, Any] = (float("inf"), None)
    for head_dim in [d for d in range(8, hidden + 1) if hidden % d == 0]:
        model = _rebuilt(state, hidden // head_dim, path)
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        diff = float(np.abs(out.numpy() - ref)[mask.astype(bool)].max())  # padded positions are free
        best = min(best, (diff, model), key=lambda b: b[0])
    if best[0] > atol:
        raise OnnxImportError(f"{path}: the rebuilt BertModel does not reproduce the ONNX output "
                              f"(smallest max |diff| {best[0]:.3g} > {atol})")
    return best[1]


def _rebuilt(state: dict[str, torch.Tensor], heads: int, path: Path) -> Any:

    with torch.random.fork_rng():  # the pooler is not in the graph: the same fresh init every time
        torch.manual_seed(0)
        model = BertModel(_config_from_state(state, heads), add_pooling_layer=True).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.") and "position_ids" not in k]
    if missing or unexpected:
        raise OnnxImportError(f"{path}: weights missing {missing[:4]} / not understood {unexpected[:4]}")
    return model


def convert(path: str | Path, out: str | Path, tokenizer: str | Path) -> Path:
    """Write the rebuilt encoder and ``tokenizer``'s files as a plain transformers folder at ``out``."""

    model = bert_from_onnx(path)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    if len(tok) > model.config.vocab_size:
        raise OnnxImportError(f"{tokenizer}: its {len(tok)} tokens exceed the graph's vocabulary "
                              f"({model.config.vocab_size})")
    model.config.pad_token_id = tok.pad_token_id
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out
