"""``slimtune quantize`` for causal LMs: weight-only int8 / int4 on the fastest CPU kernel, by measurement.

A decoder at batch size 1 is bound by reading its weights once per token, so quantization pays
only where a kernel computes with the codes. The candidates for a scheme:

- int8: ``llama.cpp-q8_0`` (the model written as GGUF Q8_0, run by llama.cpp) and ``torch-int8``
  (per-channel symmetric codes on ``torch._weight_int8pack_mm``);
- int4: ``llama.cpp-q4_0-gptq`` with calibration data (``--calib``, else ``--train``): Q4_0 codes
  GPTQ-rounded layer by layer (:mod:`slimtune.compress.quant.gptq`), then ``--norm-steps`` of
  norm tuning against the fp32 model (:mod:`slimtune.compress.quant.norm_tune`), the same file
  format and kernel as plain Q4_0; without calibration ``llama.cpp-q4_0`` (round to nearest);
  ``llama.cpp-q4_k_m`` (f16 GGUF requantized by llama.cpp's own
  ``llama_model_quantize``) and ``torch-int4`` (group-wise codes on
  ``torch._weight_int4pack_mm_for_cpu``; ``--group-size`` 32/64/128/256 that divides every
  matrix: 576-wide SmolLM2 takes 32 or 64).

Every candidate is scored on ``--eval`` (answer perplexity for chat/instruction JSONL, token
perplexity for text; the same ids and masks for every backend) and timed interleaved with the
fp32 model (prefill of ``--seq-len`` prompt tokens and ``--new-tokens`` greedy tokens, bs 1,
``--threads``). The fastest decoder whose perplexity rises at most ``--max-perplexity-increase``
percent is written; ``metrics.json`` lists them all. A llama.cpp result is a folder with
``model.gguf`` (and the HF config and tokenizer, so slimtune knows its task and ids); a torch
result is slimtune's quantized safetensors folder, run on the kernels again at load.
"""

from __future__ import annotations

import copy
import ctypes
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from slimtune.benchmark.decode import interleaved_speed, llamacpp_runner, torch_runner
from slimtune.benchmark.timing import hardware_fingerprint, set_threads
from slimtune.compress.quant.api import (
    Int4WeightConfig,
    Int8WeightConfig,
    config_to_dict,
    quantize_,
)
from slimtune.compress.quant.gptq import gptq_quantize_decoder, pack_q4_0
from slimtune.compress.quant.kernels import to_kernels
from slimtune.compress.quant.norm_tune import DEFAULT_NORM_LR, DEFAULT_NORM_STEPS, tune_norms
from slimtune.compress.quant.settings import QuantizeError, QuantizeSettings, candidate_names
from slimtune.compress.quant.storage import save_quantized
from slimtune.config.fields import save_settings
from slimtune.data.chat import (
    ChatRenderer,
    detect_format,
    first_object,
    load_chat,
    references,
    tokenize_chat,
)
from slimtune.data.datasets import TokenizedData, read_text_files, tokenize_causal
from slimtune.evaluate.llamacpp import llamacpp_perplexity
from slimtune.evaluate.metrics import evaluate_causal_lm
from slimtune.export.gguf import GGUF_FILE, write_gguf
from slimtune.io import atomic_dir, atomic_write_json, weights_size_mb
from slimtune.models.loading import load_model, load_tokenizer, resolve
from slimtune.runtime.gguf_folder import GGUF_SIDECAR
from slimtune.runtime.llamacpp import LlamaCppModel

SETTINGS_FILE = "quantize.yaml"
DEFAULT_MAX_PPL_INCREASE = 5.0
SPEED_TEXT = ("Write a short review of a film you saw recently: the story, the acting, the music, and whether "
              "you would recommend it to a friend. ") * 8


@dataclass
class _Cand:
    name: str
    backend: str  # "llama.cpp" | "torch"
    path: Path | None = None  # .gguf file (llama.cpp)
    model: Any = None  # quantized module before the kernel swap (torch; what is saved)
    runnable: Any = None  # module on the kernels (torch)
    cfg: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def eval_data(path: str | None, tok: Any, max_length: int, max_rows: int | None) -> TokenizedData | None:
    """Chat/instruction JSONL -> answer-masked examples; text -> blocks of ``max_length`` tokens."""
    if path is None:
        return None
    first = first_object(Path(path), "utf-8") if Path(path).suffix.lower() in (".jsonl", ".json") else None
    if first is not None and detect_format(first[1]) in ("chat", "alpaca", "prompt-completion"):
        chat = load_chat(path, max_rows=max_rows)
        data = tokenize_chat(chat, tok, max_length, renderer=ChatRenderer(tok, "auto"))
        data.info["references"] = references(chat)
        data.info["kind"] = "answer perplexity (chat/instruction answers only)"
        return data
    data = tokenize_causal(read_text_files(path), tok, max_length, max_blocks=max_rows or 64)
    data.info["kind"] = f"token perplexity ({max_length}-token blocks)"
    return data


def _speed_prompt(tok: Any, n: int) -> list[int]:
    ids = tok(SPEED_TEXT, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


# ------------------------------------------------------------------------------------------------
# candidates
# ------------------------------------------------------------------------------------------------


def _llamacpp_requantize(src: Path, dst: Path, kind: str) -> None:
    import llama_cpp  # optional dependency (the llamacpp extra): built from source

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[kind]
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {kind} failed on {src}")


def build_gptq(model: Any, tok: Any, path: Path, calib: TokenizedData, norm_steps: int, norm_lr: float,
               seed: int = 0) -> dict[str, Any]:
    """GPTQ Q4_0 of a copy of ``model`` (+ norm tuning against ``model``) written to ``path``; what was done."""
    q = copy.deepcopy(model)
    g = gptq_quantize_decoder(q, calib.input_ids)
    tuned = tune_norms(q, model, calib, steps=norm_steps, lr=norm_lr, seed=seed) if norm_steps else None
    pre = {k: ("q4_0", pack_q4_0(codes, scales)) for k, (codes, scales) in g["codes"].items()}
    info = write_gguf(q.eval(), tok, path, quant="q4_0", prequantized=pre)
    errs = list(g["output_error"].values())
    info["gptq"] = {"sequences": g["sequences"], "tokens": g["tokens"], "seconds": g["seconds"],
                    "mean_output_error": {"round_to_nearest": sum(e[0] for e in errs) / len(errs),
                                          "gptq": sum(e[1] for e in errs) / len(errs)}}
    info["norm_tuning"] = tuned
    return info


def build(name: str, model: Any, tok: Any, work: Path, group_size: int | None, calib: TokenizedData | None = None,
          norm_steps: int = 0, norm_lr: float = DEFAULT_NORM_LR) -> _Cand:
    """Build one candidate (GGUF file in ``work``, or the quantized torch module)."""
    backend, kind = name.split("-", 1)
    t0 = time.perf_counter()
    if backend == "llama.cpp":
        path = work / f"{kind}.gguf"
        if kind == "q4_0-gptq":
            if calib is None:
                raise QuantizeError(f"{name}: needs calibration data (--calib or --train)")
            info = build_gptq(model, tok, path, calib, norm_steps, norm_lr)
        elif kind == "q4_k_m":
            write_gguf(model, tok, work / "f16.gguf", quant="f16")
            _llamacpp_requantize(work / "f16.gguf", path, kind)
            info = {"made_by": "slimtune export f16, then llama.cpp llama_model_quantize Q4_K_M"}
        else:
            info = write_gguf(model, tok, path, quant=kind)
        c = _Cand(name, backend, path=path)
        c.metrics.update(size_mb=round(path.stat().st_size / 1e6, 2), info=info)
    else:
        cfg = (Int8WeightConfig(include_embeddings=False) if kind == "int8"
               else Int4WeightConfig(group_size=group_size or 32, include_embeddings=False))
        q = quantize_(copy.deepcopy(model), cfg)
        runnable = copy.deepcopy(q)
        swapped = to_kernels(runnable)
        c = _Cand(name, backend, model=q, runnable=runnable.eval(), cfg=cfg)
        c.metrics.update(config=config_to_dict(cfg), kernels=len(swapped))
    c.metrics["build_seconds"] = round(time.perf_counter() - t0, 1)
    return c


def _open(c: _Cand, threads: int, n_ctx: int, logits_all: bool = False) -> LlamaCppModel:
    return LlamaCppModel(c.path, n_threads=threads, n_ctx=n_ctx, logits_all=logits_all)


def score(c: _Cand, data: TokenizedData, threads: int) -> None:
    """Perplexity of ``c`` on ``data`` (the fp32 model's ids and masks)."""
    if c.backend == "torch":
        with torch.inference_mode():
            r = evaluate_causal_lm(c.runnable, data)
    else:
        m = _open(c, threads, max(len(x) for x in data.input_ids) + 8, logits_all=True)
        try:
            r = llamacpp_perplexity(m, data)
        finally:
            m.close()
    c.metrics.update(perplexity=r["perplexity"], loss=r["loss"], tokens=r["tokens"])


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def run_decoder_quantize(s: QuantizeSettings) -> dict[str, Any]:
    """Build, score and time every candidate; write the fastest within the perplexity gate."""
    set_threads(s.threads)
    src, gate = Path(resolve(s.model)), s.max_perplexity_increase  # an alias (smollm2) is its local folder
    gate = DEFAULT_MAX_PPL_INCREASE if gate is None else gate
    tok = load_tokenizer(str(src))
    model = load_model(str(src), "causal-lm").eval()
    data = eval_data(s.eval, tok, s.max_length or 256, s.max_eval_samples)
    calib = eval_data(s.calibration_file(), tok, s.max_length or 256, s.calib_samples)
    norm_steps = (DEFAULT_NORM_STEPS if calib is not None else 0) if s.norm_steps is None else s.norm_steps
    prompt = _speed_prompt(tok, s.seq_len)
    fp32 = _Cand("fp32", "torch", runnable=model)
    fp32.metrics["size_mb"] = weights_size_mb(src) if src.is_dir() else \
        sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 1e6  # a hub id
    out = Path(str(s.output))
    with atomic_dir(out) as tmp, _work_dir(out) as work_name:
        work = Path(work_name)
        cands = [build(n, model, tok, work, s.group_size, calib, norm_steps, s.norm_lr)
                 for n in candidate_names(s.scheme, s.backend, calibrated=calib is not None)]
        opened = {c.name: _open(c, s.threads, len(prompt) + s.new_tokens + 8) for c in cands if c.backend == "llama.cpp"}
        runners = {c.name: (llamacpp_runner(opened[c.name], prompt) if c.name in opened else torch_runner(c.runnable, prompt))
                   for c in (fp32, *cands)}
        speed = interleaved_speed(runners, dict.fromkeys(runners, len(prompt)), new_tokens=s.new_tokens,
                                  repeats=s.repeats)
        for m in opened.values():
            m.close()
        for c in (fp32, *cands):
            c.metrics.update(speed[c.name])
        if data is not None:
            score_fastest_first(fp32, cands, data, s.threads, gate)
        chosen, why = choose(cands, fp32, gate)
        if chosen is None:
            raise QuantizeError(f"{src}: {why}; nothing written (raise --max-perplexity-increase or try --scheme int8)")
        _write(chosen, model, tok, src, tmp)
        metrics = _metrics(s, src, data, fp32, cands, chosen, why, gate, tmp)
        atomic_write_json(tmp / "metrics.json", metrics)
        save_settings(replace(s, overwrite=False), tmp / SETTINGS_FILE)
    return metrics


def _work_dir(out: Path) -> Any:
    out.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-")


def score_fastest_first(fp32: _Cand, cands: list[_Cand], data: TokenizedData, threads: int, gate_pct: float) -> None:
    """Perplexity of fp32, then of the candidates from the fastest down until one is within the gate.

    The choice is the fastest candidate within the gate, so the slower ones cannot be chosen once
    one passes: they are not scored (``not_scored`` says why). Scoring is most of a run's time
    where a kernel is slow (torch's int4 on a CPU without its fast path: minutes for a 135M model).
    """
    score(fp32, data, threads)
    ref = fp32.metrics["perplexity"]
    passed: _Cand | None = None
    for c in sorted(cands, key=lambda c: -c.metrics["decode_tokens_per_s"]):
        if passed is not None:
            c.metrics["not_scored"] = f"slower than {passed.name}, which is within the perplexity gate"
            continue
        score(c, data, threads)
        if (c.metrics["perplexity"] / ref - 1) * 100 <= gate_pct:
            passed = c


def choose(cands: list[_Cand], fp32: _Cand, gate_pct: float) -> tuple[_Cand | None, str]:
    """The fastest decoder whose perplexity is within ``gate_pct`` percent of fp32's."""
    ref = fp32.metrics.get("perplexity")
    ok = []
    for c in (c for c in cands if "not_scored" not in c.metrics):
        ppl = c.metrics.get("perplexity")
        c.metrics["perplexity_increase_pct"] = (ppl / ref - 1) * 100 if ppl is not None and ref else None
        if c.metrics["perplexity_increase_pct"] is not None and c.metrics["perplexity_increase_pct"] > gate_pct:
            c.metrics["rejected"] = f"perplexity +{c.metrics['perplexity_increase_pct']:.2f}% > {gate_pct:g}%"
        else:
            ok.append(c)
    if not ok:
        return None, "; ".join(f"{c.name}: {c.metrics['rejected']}" for c in cands)
    best = max(ok, key=lambda c: c.metrics["decode_tokens_per_s"])
    x = best.metrics["decode_tokens_per_s"] / fp32.metrics["decode_tokens_per_s"]
    gated = f"perplexity within {gate_pct:g}% of fp32" if ref else "no --eval: perplexity not measured"
    return best, (f"fastest decode of {len(ok)} candidate(s) with {gated}: {best.metrics['decode_tokens_per_s']:.1f} "
                  f"tok/s, {x:.2f}x fp32")


def _write(c: _Cand, model: Any, tok: Any, src: Path, tmp: Path) -> None:
    if c.backend == "torch":
        save_quantized(c.model, tmp, c.cfg, tok, extra={"kernel": c.name, "task": "causal-lm"})
        return
    shutil.copy2(c.path, tmp / GGUF_FILE)
    model.config.save_pretrained(tmp)  # the task and shapes, for slimtune; weights are in the GGUF
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    atomic_write_json(tmp / GGUF_SIDECAR, {"format": "gguf", "backend": "llama.cpp", "file": GGUF_FILE,
                                          "type": c.name.split("-", 1)[1], "source": str(src)})


def _metrics(s: QuantizeSettings, src: Path, data: Any, fp32: _Cand, cands: list[_Cand], chosen: _Cand, why: str,
             gate: float, tmp: Path) -> dict[str, Any]:
    size = weights_size_mb(tmp) if chosen.backend == "torch" else round((tmp / GGUF_FILE).stat().st_size / 1e6, 2)
    return {
        "model": str(src), "task": "causal-lm", "scheme": s.scheme, "eval_file": s.eval,
        "eval": (data.info.get("kind") if data is not None else None), "eval_n": len(data) if data is not None else 0,
        "gates": {"max_perplexity_increase_pct": gate},
        "speed_setting": {"batch_size": 1, "prompt_tokens": s.seq_len, "new_tokens": s.new_tokens,
                          "threads": s.threads, "repeats": s.repeats},
        "fp32": fp32.metrics, "candidates": {c.name: {"backend": c.backend, **c.metrics} for c in cands},
        "backend": chosen.backend, "backend_candidate": chosen.name, "backend_reason": why,
        "size_mb": size, "compression": fp32.metrics["size_mb"] / max(size, 1e-9),
        "perplexity": chosen.metrics.get("perplexity"),
        "decode_tokens_per_s": chosen.metrics["decode_tokens_per_s"],
        "speedup": chosen.metrics["decode_tokens_per_s"] / fp32.metrics["decode_tokens_per_s"],
        "hardware": hardware_fingerprint()}


def format_decoder_summary(m: dict[str, Any]) -> str:
    """A short human summary of a decoder quantize run."""
    f = m["fp32"]
    ppl = (f"perplexity {m['perplexity']:.4f} (fp32 {f['perplexity']:.4f})" if m.get("perplexity") is not None
           else "perplexity n/a (no --eval)")
    st = m["speed_setting"]
    return "\n".join([
        f"scheme {m['scheme']}  backend {m['backend_candidate']}",
        f"size {m['size_mb']:.1f} MB (fp32 {f['size_mb']:.1f} MB, {m['compression']:.2f}x smaller)",
        f"decode {m['decode_tokens_per_s']:.1f} tok/s (fp32 {f['decode_tokens_per_s']:.1f}, {m['speedup']:.2f}x)"
        f"  [bs 1, {st['prompt_tokens']}-token prompt, {st['new_tokens']} new, {st['threads']} thread(s)]",
        ppl, f"why: {m['backend_reason']}"])
