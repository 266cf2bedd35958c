"""Fast CPU int8 inference: build every candidate backend, check parity, time them side by side,
pick the fastest that keeps the numbers.

Candidates (int8 weights, activations quantized on the fly per call):

- ``torch``: slimtune's own int8 codes (per channel or per tensor, symmetric or asymmetric, as
  the :class:`~slimtune.compress.quant.api.Int8WeightConfig` says) loaded into
  ``torch.ao.nn.quantized.dynamic.Linear`` (fbgemm/x86 kernels); embeddings stay int8 and are
  decoded row by row at lookup. The artifact is the slimtune quantized folder.
- ``torchao``: ``torchao.quantization.Int8DynamicActivationInt8WeightConfig`` (eager; on CPU
  without ``torch.compile`` it is usually far slower, which the pre-screen shows and records):
  per-channel symmetric Linear weights, embeddings left in float.
- ``onnxruntime``: ONNX export with eager attention, ORT transformer fusions (Attention,
  EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), then ORT dynamic int8
  quantization (symmetric weights, per channel or per tensor, embedding tables included unless
  asked not to). The artifact is the ONNX folder.

A backend that cannot run the requested settings exactly is not built (:func:`int8_backend_gap`
says why): a choice is never reported under settings it did not apply.

Parity is judged on the evaluation set: SQNR of the logits against fp32 (torchao's
``compute_error``) and accuracy. Latency is measured interleaved with
:func:`slimtune.benchmark.latency.measure_latency`, so all candidates see the same machine state.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynLinear
from torch.ao.quantization import quantize_dynamic

from slimtune.benchmark.timing import measure_latency
from slimtune.compress.quant.api import Int8WeightConfig, QuantizedLinear, _set_module, quantize_
from slimtune.compress.quant.linear import sqnr_db
from slimtune.compress.quant.mixed import rank_layers
from slimtune.compress.quant.onnx import (
    ONNX_FILE,
    ONNX_SIDECAR,
    export_onnx,
    load_onnx_classifier,
    matmul_nodes,
    optimize_onnx,
    parity,
    quantize_onnx,
    write_onnx_folder,
)
from slimtune.compress.quant.storage import load_quantized, save_quantized
from slimtune.data.datasets import TokenizedData
from slimtune.io import atomic_write_json
from slimtune.runtime.predict import Predict, predict_all, torch_predict

BACKENDS = ("torch", "torchao", "onnxruntime")


@dataclass
class Candidate:
    """One way to run the int8 model: a predict function and the folder that holds it."""

    name: str
    backend: str
    predict: Predict
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# torch: our int8 codes in fbgemm dynamic-quantized Linear modules
# --------------------------------------------------------------------------------------------


def int8_backend_gap(backend: str, cfg: Int8WeightConfig) -> str | None:
    """Why ``backend`` cannot run int8 weights exactly as ``cfg`` says, or None when it can."""
    if cfg.granularity == "group":
        return "int8 kernels take one scale per tensor or per output channel, not group-wise (use --scheme int4 for group-wise storage)"
    if backend == "onnxruntime" and not cfg.symmetric:
        return "ONNX Runtime's dynamic int8 weights are symmetric"
    if backend == "torchao":
        if cfg.granularity != "channel" or not cfg.symmetric:
            return "torchao's int8 dynamic config is per-channel symmetric only"
        if cfg.include_embeddings:
            return "torchao leaves the embedding tables in float (give --no-embeddings)"
    return None


def to_torch_dynamic(model: nn.Module) -> nn.Module:
    """Swap every int8 per-channel or per-tensor :class:`QuantizedLinear` (symmetric or not) for
    torch's dynamic int8 Linear built from the *same* codes, scales and zero points (no
    re-quantization). In place."""

    for fqn, m in list(model.named_modules()):
        if not isinstance(m, QuantizedLinear):
            continue
        meta = m.qmeta
        if not (meta["kind"] == "affine" and meta["bits"] == 8 and meta["granularity"] in ("channel", "tensor")):
            continue
        scale = m.scale.double().expand(m.out_features).contiguous()
        zp = getattr(m, "zero_point", None) if not meta["symmetric"] else None
        zp = (torch.zeros(m.out_features, dtype=torch.long) if zp is None
              else zp.long().expand(m.out_features).contiguous())
        with warnings.catch_warnings():  # quantized tensors are "deprecated" but still the fbgemm path
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(m.qdata.reshape(m.out_features, m.in_features),
                                                          scale, zp, 0)
            dyn = DynLinear(m.in_features, m.out_features, bias_=m.bias is not None, dtype=torch.qint8)
            dyn.set_weight_bias(qw, None if m.bias is None else m.bias.detach().float())
        _set_module(model, fqn, dyn)
    return model


def build_torch(model: nn.Module, work_dir: Path, tokenizer: Any, cfg: Int8WeightConfig | None = None) -> Candidate:
    """int8 in slimtune's format as ``cfg`` says (default per-channel symmetric), served through
    torch's dynamic int8 kernels."""

    cfg = cfg or Int8WeightConfig()
    gap = int8_backend_gap("torch", cfg)
    if gap is not None:
        raise ValueError(f"torch backend: {gap}")
    q = quantize_(copy.deepcopy(model).eval(), cfg)
    path = work_dir / "torch"
    save_quantized(q, path, cfg, tokenizer, extra={"backend": "torch"})
    served = to_torch_dynamic(load_quantized(path))
    sym = "symmetric" if cfg.symmetric else "asymmetric"
    emb = {"tensor": "int8 per-tensor", "channel": "int8 per-row"}[cfg.granularity]
    return Candidate(f"torch-int8-{cfg.granularity}", "torch", torch_predict(served), path,
                     {"weights": f"int8 per-{cfg.granularity} {sym} (slimtune codes)",
                      "embeddings": emb if cfg.include_embeddings else "fp32"})


def build_torch_baseline(model: nn.Module) -> Candidate:
    """``torch.ao.quantization.quantize_dynamic`` with its defaults (per-tensor, fp32 embeddings)."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
    return Candidate("torch-quantize_dynamic", "torch", torch_predict(q), None,
                     {"weights": "int8 per-tensor", "embeddings": "fp32"})


def build_torchao(model: nn.Module) -> Candidate:
    """torchao ``Int8DynamicActivationInt8WeightConfig`` on the Linear layers (eager mode)."""
    import torchao.quantization as tq  # optional dependency (the quant extra)

    q = copy.deepcopy(model).eval()
    tq.quantize_(q, tq.Int8DynamicActivationInt8WeightConfig())
    return Candidate("torchao-int8-dynamic", "torchao", torch_predict(q), None,
                     {"weights": "int8 per-channel (torchao)", "embeddings": "fp32"})


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------


def onnx_predict(model_dir: Path, threads: int | None = None) -> Predict:
    """A Predict over an ONNX folder (see :func:`slimtune.compress.quant.onnx.load_onnx_classifier`)."""

    clf = load_onnx_classifier(model_dir, threads)
    return lambda batch: clf(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))


def build_onnxruntime(model: nn.Module, work_dir: Path, tokenizer: Any, *, fused: bool = True,
                      per_channel: bool = True, quantize_embeddings: bool = True,
                      name: str = "onnxruntime-int8-fused") -> Candidate:
    """Export -> (fuse) -> ORT dynamic int8 quantization, in a self-describing ONNX folder."""

    path = work_dir / name
    info = write_onnx_folder(model, path, tokenizer, optimize=fused, quantize=True,
                             per_channel=per_channel, quantize_embeddings=quantize_embeddings)
    return Candidate(name, "onnxruntime", onnx_predict(path), path, info)


def build_onnxruntime_mixed(model: nn.Module, work_dir: Path, tokenizer: Any, calib: TokenizedData, *,
                            target_db: float, max_layers: int = 6, per_channel: bool = True,
                            quantize_embeddings: bool = True,
                            name: str = "onnxruntime-int8-mixed") -> Candidate | None:
    """ORT int8 with the fewest float-activation layers that reach ``target_db`` on ``calib``.

    Layers are ranked once in torch (:func:`slimtune.compress.quant.mixed.rank_layers`); then, worst
    first, one more layer keeps float activations (int8 weight-only) until the real ORT graph
    reaches the target on the calibration data, or ``max_layers`` is reached. Returns None
    when the all-int8 graph already reaches the target (nothing to add).
    """

    path = work_dir / name
    path.mkdir(parents=True, exist_ok=True)
    raw, fused = work_dir / f"{name}.raw.onnx", work_dir / f"{name}.fused.onnx"
    info: dict[str, Any] = export_onnx(model, raw)
    info["export_max_abs_diff"] = parity(model, raw)
    info["fusions"] = optimize_onnx(raw, fused, model.config)
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    nodes = matmul_nodes(fused)
    ranking = rank_layers(model, calib, eligible=lambda n: n in nodes)
    ref = predict_all(torch_predict(model), calib)
    chosen: list[str] = []
    trace: list[tuple[int, float]] = []
    while True:
        info["quantization"] = quantize_onnx(fused, path / ONNX_FILE, per_channel=per_channel,
                                             quantize_embeddings=quantize_embeddings,
                                             float_activation_nodes=[nodes[n] for n in chosen])
        s = sqnr_db(ref, predict_all(onnx_predict(path), calib))
        trace.append((len(chosen), round(s, 2)))
        if s >= target_db or len(chosen) >= min(max_layers, len(ranking)):
            break
        chosen.append(ranking[len(chosen)][1])
    for p in (raw, fused):
        p.unlink(missing_ok=True)
    if not chosen:
        return None
    info["mixed_precision"] = {"float_activation_layers": chosen, "target_db": target_db,
                               "calib_sqnr_trace": trace, "calib_n": len(calib),
                               "ranking": [(round(s, 2), n) for s, n in ranking[:8]]}
    atomic_write_json(path / ONNX_SIDECAR, info)
    return Candidate(name, "onnxruntime", onnx_predict(path), path, info)


def build_candidates(model: nn.Module, tokenizer: Any, work_dir: Path, backends: list[str],
                     baselines: bool = False, calib: TokenizedData | None = None,
                     target_db: float = 30.0,
                     cfg: Int8WeightConfig | None = None) -> tuple[list[Candidate], dict[str, str]]:
    """Build the candidates of ``backends``; return (candidates, {name: why it failed}).

    With ``calib`` data, ONNX Runtime also gets a mixed-precision candidate aiming at ``target_db``.
    ``cfg`` (default per-channel symmetric) is what the torch and ONNX Runtime candidates apply;
    callers pass only backends that can run it (:func:`int8_backend_gap`).
    """
    cfg = cfg or Int8WeightConfig()
    ort_kw = {"per_channel": cfg.granularity == "channel", "quantize_embeddings": cfg.include_embeddings}
    work_dir.mkdir(parents=True, exist_ok=True)
    builders: list[tuple[str, Callable[[], Candidate | None]]] = []
    if "onnxruntime" in backends:
        builders.append(("onnxruntime-int8-fused", lambda: build_onnxruntime(model, work_dir, tokenizer, **ort_kw)))
        if calib is not None and cfg.granularity == "channel":  # its weight-only layers are per channel
            builders.append(("onnxruntime-int8-mixed", lambda: build_onnxruntime_mixed(
                model, work_dir, tokenizer, calib, target_db=target_db, **ort_kw)))
    if "torch" in backends:
        builders.append((f"torch-int8-{cfg.granularity}", lambda: build_torch(model, work_dir, tokenizer, cfg)))
    if "torchao" in backends:
        builders.append(("torchao-int8-dynamic", lambda: build_torchao(model)))
    if baselines:
        builders.append(("torch-quantize_dynamic", lambda: build_torch_baseline(model)))
        builders.append(("onnxruntime-int8-plain", lambda: build_onnxruntime(
            model, work_dir, tokenizer, fused=False, per_channel=False, name="onnxruntime-int8-plain")))
    out, failed = [], {}
    for name, build in builders:
        try:
            cand = build()
            if cand is not None:
                out.append(cand)
        except ImportError as e:
            failed[name] = f"not installed ({e.name})"
        except Exception as e:  # one broken backend must not stop the others
            failed[name] = f"{type(e).__name__}: {e}"
    return out, failed


# --------------------------------------------------------------------------------------------
# Choosing by measurement
# --------------------------------------------------------------------------------------------


def accuracy(logits: torch.Tensor, labels: list[int] | None) -> float | None:
    """Fraction of argmax predictions equal to ``labels`` (None without labels)."""
    if labels is None:
        return None
    return float((logits.argmax(-1) == torch.tensor(labels)).float().mean())


def score_parity(cands: list[Candidate], ref_logits: torch.Tensor, data: TokenizedData) -> None:
    """Fill each candidate's metrics with logits SQNR vs fp32 and accuracy on ``data``."""
    for c in cands:
        t0 = time.perf_counter()
        lg = predict_all(c.predict, data)
        c.metrics.update(sqnr_db=sqnr_db(ref_logits, lg), accuracy=accuracy(lg, data.labels),
                         agreement=float((lg.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
                         eval_seconds=round(time.perf_counter() - t0, 2))


def time_candidates(predicts: dict[str, Predict], inputs: dict[str, torch.Tensor], *, repeats: int = 30,
                    warmup: int = 3, prescreen_ratio: float = 3.0) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Interleaved latency of every Predict on ``inputs``; the first entry is the reference.

    A candidate slower than ``prescreen_ratio`` x the reference over 3 calls is dropped before
    the long interleaved run (recorded with its pre-screen time) so it cannot eat the budget.
    The fastest candidate is always kept: the pre-screen narrows a choice, it never leaves
    none (a backend forced by the user is its only candidate, and 3 calls on a busy CPU are noisy).
    """

    names = list(predicts)
    pre: dict[str, float] = {}
    for n in names:
        predicts[n](inputs)
        t0 = time.perf_counter()
        for _ in range(3):
            predicts[n](inputs)
        pre[n] = (time.perf_counter() - t0) / 3 * 1000
    ref = pre[names[0]]
    fastest = min(names[1:], key=pre.__getitem__, default=None)
    dropped = {n: f"pre-screen {pre[n]:.1f} ms vs {ref:.1f} ms for {names[0]} (> {prescreen_ratio:g}x)"
               for n in names[1:] if pre[n] > prescreen_ratio * ref and n != fastest}
    runners = {n: (lambda p=predicts[n]: p(inputs)) for n in names if n not in dropped}
    return measure_latency(runners, repeats=repeats, warmup=warmup), dropped


def choose(cands: list[Candidate], fp32_accuracy: float | None, *, min_sqnr_db: float,
           max_accuracy_drop: float) -> tuple[Candidate | None, str]:
    """The fastest candidate whose SQNR and accuracy drop pass; with the reason in words."""
    def ok(c: Candidate) -> tuple[bool, str]:
        m = c.metrics
        if "latency_ms_p50" not in m:
            return False, m.get("dropped", "not timed")
        if m["sqnr_db"] < min_sqnr_db:
            return False, f"SQNR {m['sqnr_db']:.1f} dB < {min_sqnr_db:g}"
        if fp32_accuracy is not None and m["accuracy"] is not None:
            drop = (fp32_accuracy - m["accuracy"]) * 100
            if drop > max_accuracy_drop:
                return False, f"accuracy drop {drop:.2f} pt > {max_accuracy_drop:g}"
        return True, "passes"

    verdicts = {c.name: ok(c) for c in cands}
    passing = sorted((c for c in cands if verdicts[c.name][0]), key=lambda c: c.metrics["latency_ms_p50"])
    others = "; ".join(f"{n}: {v[1]}" for n, v in verdicts.items() if not v[0])
    if passing:
        best = passing[0]
        rivals = ", ".join(f"{c.name} {c.metrics['latency_ms_p50']:.1f} ms" for c in passing[1:])
        gates = f"SQNR >= {min_sqnr_db:g} dB" + (f", accuracy drop <= {max_accuracy_drop:g} pt"
                                                 if fp32_accuracy is not None else "")
        why = (f"fastest passing parity ({gates}): {best.metrics['latency_ms_p50']:.1f} ms p50"
               + (f" vs {rivals}" if rivals else "") + (f"; rejected: {others}" if others else ""))
        return best, why
    return None, f"no candidate passed parity: {others or 'none built'}"
