"""ONNX export, ONNX Runtime graph fusion and int8 quantization, and loading for inference.

An ONNX folder written here is self-describing, so plain ``onnxruntime`` + ``tokenizers`` can
serve it without slimtune:

- ``model.onnx``: inputs ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` for BERT-like
  models), int64, shape (batch, sequence), both axes dynamic; output ``logits`` (batch, labels).
- ``config.json`` (with ``id2label``) and the tokenizer files.
- ``onnx.json``: how the graph was made (exporter, opset, fusions, quantization).

Exporter: the TorchScript ("legacy") exporter with eager attention is the default because its
graph is the one ONNX Runtime's BERT optimizer recognises (fused Attention,
EmbedLayerNormalization, SkipLayerNormalization, BiasGelu); the dynamo exporter also works
with transformers 5.23 (exact parity) but its graph fuses only the LayerNorm/Gelu parts.
Every export is checked for parity against torch on inputs of another shape, with padding.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import Dim
from transformers import AutoTokenizer

from slimtune.compress.quant.linear import encode_affine
from slimtune.io import atomic_write_json

ONNX_FILE = "model.onnx"
ONNX_SIDECAR = "onnx.json"
# ORT's optimizer model types by HF model_type (encoders whose graphs match its BERT fusions).
ORT_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
                   "electra": "bert", "mpnet": "bert", "camembert": "bert"}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence tracer warnings and ORT's optimizer/quantizer logging (a quiet library)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


class _LogitsOnly(torch.nn.Module):
    """Positional (input_ids, attention_mask[, token_type_ids]) -> logits, for export."""

    def __init__(self, model: torch.nn.Module, with_token_types: bool):
        super().__init__()
        self.model = model
        self.with_token_types = with_token_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kw = {"token_type_ids": token_type_ids} if self.with_token_types else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits


def uses_token_types(model: torch.nn.Module) -> bool:
    """True if the model has a token-type (segment) embedding, as BERT does."""
    return getattr(model.config, "type_vocab_size", 0) > 1 or "token_type_ids" in getattr(
        model, "_onnx_inputs", ())


def _example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(3, max(4, vocab), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0  # one padded row, so the mask path is traced with real padding
    out = {"input_ids": ids, "attention_mask": mask}
    if uses_token_types(model):
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return out


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, exporter: str = "legacy",
                opset: int = 17) -> dict[str, Any]:
    """Export a sequence classifier to ``path`` with dynamic batch and sequence axes.

    Returns info (exporter, opset, inputs, seconds). The wrapper is put in eval mode *before*
    export: the TorchScript exporter restores the wrapper's mode afterwards, and a fresh
    wrapper is in train mode, which would silently switch dropout on in the caller's model.
    """
    model.eval()
    # Eager attention exports as MatMul -> Mul -> Add(mask) -> Softmax -> MatMul with a plain
    # 2-D -> 4-D mask, the pattern ORT fuses into one Attention op; SDPA's export decomposes
    # into a mask graph (Range/GreaterOrEqual/And) that no fusion matches.
    previous_attn = getattr(model.config, "_attn_implementation", None)
    if previous_attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    wrapper = _LogitsOnly(model, uses_token_types(model)).eval()
    ex = _example_inputs(model)
    names = list(ex)
    t0 = time.perf_counter()
    with torch.no_grad(), quiet():
        if exporter == "legacy":
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
            torch.onnx.export(wrapper, tuple(ex.values()), str(path), dynamo=False, input_names=names,
                              output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}},
                              opset_version=opset, do_constant_folding=True)
        elif exporter == "dynamo":

            b, s = Dim("batch"), Dim("sequence")
            torch.onnx.export(wrapper, tuple(ex.values()), str(path), dynamo=True, input_names=names,
                              output_names=["logits"], dynamic_shapes={n: {0: b, 1: s} for n in names},
                              opset_version=max(opset, 18), external_data=False, verbose=False)
        else:
            raise ValueError(f"exporter must be legacy or dynamo, got {exporter!r}")
    model.eval()
    if previous_attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(previous_attn)
    return {"exporter": exporter, "opset": opset if exporter == "legacy" else max(opset, 18),
            "inputs": names, "export_seconds": round(time.perf_counter() - t0, 2)}


def optimize_onnx(src: str | os.PathLike, dst: str | os.PathLike, config: Any) -> dict[str, int]:
    """Fuse the graph with ONNX Runtime's transformer optimizer; return fused-op counts.

    Fusions (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu) cut the
    number of kernels per layer several times; a model type the optimizer does not know is
    copied unchanged (empty dict returned).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions  # optional: quant extra
    from onnxruntime.transformers.optimizer import optimize_model  # optional: quant extra

    mtype = ORT_MODEL_TYPES.get(getattr(config, "model_type", ""))
    if mtype is None:

        shutil.copyfile(src, dst)
        return {}
    with quiet():
        opt = optimize_model(str(src), model_type=mtype, num_heads=int(config.num_attention_heads),
                             hidden_size=int(config.hidden_size), optimization_options=FusionOptions(mtype),
                             opt_level=0)
    opt.save_model_to_file(str(dst))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def matmul_nodes(path: str | os.PathLike) -> dict[str, str]:
    """Module name -> ONNX MatMul node name for the Linear layers left as plain MatMuls.

    The TorchScript exporter names nodes by module scope: ``/model/bert/encoder/layer.0/
    output/dense/MatMul`` is module ``bert.encoder.layer.0.output.dense``.
    """
    import onnx  # optional dependency (the quant extra)

    out = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/model/") and node.name.endswith("/MatMul"):
            out[node.name[len("/model/"):-len("/MatMul")].replace("/", ".")] = node.name
    return out


def weight_only_int8(path: str | os.PathLike, node_names: list[str]) -> int:
    """Store the constant weight of each named float MatMul as int8 + per-column scale, decoded
    by a DequantizeLinear node in the graph (float activations, ~4x smaller weight). In place.
    Returns how many weights were converted."""
    import onnx  # optional dependency (the quant extra)
    from onnx import helper, numpy_helper  # optional dependency (the quant extra)

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    users: dict[str, int] = {}
    for node in g.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    new_nodes, done = [], 0
    for node in g.node:
        if node.name not in node_names or node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())  # (K, N): x @ W
        meta, t = encode_affine(w.T.contiguous(), bits=8, symmetric=True, granularity="channel", group_size=0)
        base = node.input[1]
        q = numpy_helper.from_array(t["qdata"].T.contiguous().numpy(), base + "_int8")
        sc = numpy_helper.from_array(t["scale"].float().numpy(), base + "_scale")
        zp = numpy_helper.from_array(np.zeros(w.shape[1], dtype=np.int8), base + "_zp")
        g.initializer.extend([q, sc, zp])
        new_nodes.append(helper.make_node("DequantizeLinear", [q.name, sc.name, zp.name], [base + "_dq"],
                                          name=node.name + "_weight_dq", axis=1))
        if users.get(base, 0) == 1:
            g.initializer.remove(inits[base])
        node.input[1] = base + "_dq"
        done += 1
    for n in reversed(new_nodes):  # constants first: keeps the node list topologically sorted
        g.node.insert(0, n)
    onnx.save(model, str(path))
    return done


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, per_channel: bool = True,
                  quantize_embeddings: bool = True, reduce_range: bool = False,
                  float_activation_nodes: list[str] | None = None) -> dict[str, Any]:
    """ONNX Runtime dynamic quantization: int8 weights, uint8 activations quantized per call.

    MatMul and fused Attention weights become int8 (per output channel with ``per_channel``);
    with ``quantize_embeddings`` the word/position tables (Gather, EmbedLayerNormalization)
    are stored int8 too, which is most of a small encoder's bytes.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic  # optional: quant extra

    ops = ["MatMul", "Attention"] + (["Gather", "EmbedLayerNormalization"] if quantize_embeddings else [])
    exclude = list(float_activation_nodes or [])
    with quiet():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=ops, per_channel=per_channel,
                         nodes_to_exclude=exclude,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1})  # 1 = FLOAT: fused contrib ops defeat shape inference
    converted = weight_only_int8(dst, exclude) if exclude else 0
    return {"per_channel": per_channel, "quantized_ops": ops, "reduce_range": reduce_range,
            "float_activation_nodes": exclude, "weight_only_int8_nodes": converted}


def session(path: str | os.PathLike, threads: int | None = None, fold_weight_dq: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` on CPU with all graph optimizations enabled.

    ``threads`` defaults to ``$SLIMTUNE_THREADS`` (set by slimtune.benchmark.latency.set_threads), else ORT's
    own default. Inter-op parallelism is off: BERT graphs are sequential. ``fold_weight_dq``
    lets constant folding decode int8 weight-only layers once at load (ORT keeps
    DequantizeLinear nodes unfolded unless ``session.disable_quant_qdq`` is set, which would
    otherwise decode those weights on every call).
    """
    import onnxruntime as ort  # optional dependency (the quant extra)

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("SLIMTUNE_THREADS", "0") or 0)
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if fold_weight_dq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxClassifier:
    """A served ONNX sequence classifier: ``clf(input_ids, attention_mask, token_type_ids) -> logits``.

    Inputs may be torch tensors, numpy arrays or nested lists of ints, shape (batch, sequence);
    ``attention_mask`` defaults to all ones, ``token_type_ids`` to zeros (ignored if the graph
    has no such input). Returns float32 logits (batch, num_labels) as a torch tensor.

    Attributes: ``config`` (config.json as a dict), ``id2label`` (int -> name), ``input_names``,
    ``path`` (the folder); ``tokenizer()`` loads the folder's tokenizer.
    """

    def __init__(self, model_dir: str | os.PathLike, threads: int | None = None):
        d = Path(model_dir)
        onnx_path = d / ONNX_FILE
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path}: not found (an ONNX folder needs model.onnx + config.json)")
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: not found (an ONNX folder needs model.onnx + config.json)")
        self.path = d
        self.config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
        self.id2label = {int(k): v for k, v in (self.config.get("id2label") or {}).items()}
        side = d / ONNX_SIDECAR
        info = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
        fold = bool((info.get("quantization") or {}).get("weight_only_int8_nodes"))
        self.session = session(onnx_path, threads, fold_weight_dq=fold)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> torch.Tensor:
        ids = _to_numpy(input_ids)
        feeds = {"input_ids": ids,
                 "attention_mask": np.ones_like(ids) if attention_mask is None else _to_numpy(attention_mask)}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids) if token_type_ids is None else _to_numpy(token_type_ids)
        return torch.from_numpy(self.session.run(["logits"], feeds)[0])

    def tokenizer(self) -> Any:
        """The folder's tokenizer (transformers AutoTokenizer)."""

        return AutoTokenizer.from_pretrained(self.path)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.int64))


def load_onnx_classifier(model_dir: str | os.PathLike, threads: int | None = None) -> OnnxClassifier:
    """Load an ONNX folder (model.onnx + config.json + tokenizer) written by slimtune.

    Returns a callable ``(input_ids, attention_mask=None, token_type_ids=None) -> logits``
    (torch float32 tensor, (batch, num_labels)); see :class:`OnnxClassifier`.
    """
    return OnnxClassifier(model_dir, threads)


def write_onnx_folder(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, *,
                      optimize: bool = True, quantize: bool = False, per_channel: bool = True,
                      quantize_embeddings: bool = True, exporter: str = "legacy",
                      float_activation_layers: list[str] | None = None) -> dict[str, Any]:
    """Export ``model`` into a self-describing ONNX folder (fp32, or int8 with ``quantize``).

    Steps: export (+ parity check vs torch) -> optional ORT fusion -> optional int8 dynamic
    quantization, where ``float_activation_layers`` (module names of Linear layers, see
    :mod:`slimtune.compress.quant.mixed`) keep float activations and int8 weight-only storage.
    Intermediate graphs are removed; ``onnx.json`` records what was done.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw, fused = out / "model.raw.onnx", out / "model.fused.onnx"
    info: dict[str, Any] = export_onnx(model, raw, exporter=exporter)
    info["export_max_abs_diff"] = parity(model, raw)
    if info["export_max_abs_diff"] > 1e-3:
        raise RuntimeError(f"ONNX export of {type(model).__name__} disagrees with torch "
                           f"(max |diff| {info['export_max_abs_diff']:.2e})")
    src = raw
    if optimize:
        try:
            info["fusions"] = optimize_onnx(raw, fused, model.config)
            src = fused
        except Exception as e:  # an optimizer failure costs speed, never the export
            info["fusions_error"] = f"{type(e).__name__}: {e}"
    if quantize:
        nodes = matmul_nodes(src)
        missing = [n for n in float_activation_layers or [] if n not in nodes]
        if missing:
            raise ValueError(f"no plain MatMul node in the ONNX graph for layer(s) {missing[:3]}")
        info["quantization"] = quantize_onnx(src, out / ONNX_FILE, per_channel=per_channel,
                                             quantize_embeddings=quantize_embeddings,
                                             float_activation_nodes=[nodes[n] for n in float_activation_layers or []])
    else:
        os.replace(src, out / ONNX_FILE)
    for p in (raw, fused):
        p.unlink(missing_ok=True)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    atomic_write_json(out / ONNX_SIDECAR, info)
    return info


def parity(model: torch.nn.Module, onnx_path: str | os.PathLike, batch: int = 3, seq: int = 24) -> float:
    """Max |logits difference| between ``model`` and the ONNX graph on padded random inputs
    of a shape different from the export example (checks the dynamic axes too)."""
    ex = _example_inputs(model, batch, seq)
    with torch.inference_mode():
        ref = model(**ex).logits.float().numpy()
    sess = session(onnx_path)
    names = {i.name for i in sess.get_inputs()}
    got = sess.run(["logits"], {k: v.numpy() for k, v in ex.items() if k in names})[0]
    return float(np.abs(got - ref).max())
