"""What every export is checked against: the transformers model it was made from, on one fixed prompt.

The prompt (``--check-prompt``, as a user message through the chat template when the tokenizer
has one) is tokenized by the HF tokenizer; the exported artifact then runs in its own runtime:

- GGUF (llama.cpp): its own tokenizer must give the same ids (``tokens_equal``); the logits of
  every prompt position (``max_abs_diff``, relative to the largest reference logit, and the
  fraction of positions whose arg-max agrees) and ``check_tokens`` greedy tokens, generated
  through end-of-generation tokens (``greedy_equal``, ``greedy_agree_prefix``). Speed is not
  measured here (this context keeps every position's logits): see
  :func:`slimtune.runtime.llamacpp.measure_speed`.
- ONNX decoders (onnxruntime): the prefill logits and those of every decoding step through the
  past key values, and the greedy tokens; encoders: the logits of the prompt and the class.
- safetensors: the folder reloaded by plain transformers gives the same logits and greedy tokens.

``passed`` says whether the result is what the format promises: exact tokens and greedy
agreement for lossless types (f32/f16/bf16; onnx; safetensors f32), tokenizer agreement for the
lossy GGUF types, whose logit and greedy figures are recorded for the reader to judge.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from slimtune.compress.quant.onnx import load_onnx_classifier
from slimtune.runtime.generate import SamplingConfig, prompt_ids
from slimtune.runtime.llamacpp import LlamaCppModel, llamacpp_available, llamacpp_version
from slimtune.runtime.onnx_decoder import OnnxDecoder

LOSSLESS = ("f32", "f16", "bf16")


def check_prompt_ids(tokenizer: Any, prompt: str) -> tuple[list[int], list[dict[str, str]] | None]:
    """HF token ids of the check prompt and the messages (None when sent as raw text)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return prompt_ids(tokenizer, messages, chat_template=True), messages
    return prompt_ids(tokenizer, prompt, chat_template=False), None


@torch.inference_mode()
def reference(model: torch.nn.Module, ids: list[int], n_new: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """transformers' logits of every prompt position, ``n_new`` greedy tokens (no EOS stop), and
    the last-position logits of every step."""
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    prompt_logits = out.logits[0].float().numpy()
    steps, tokens = [out.logits[0, -1].float().numpy()], []
    cache = getattr(out, "cache", None) or out.past_key_values
    for step in range(n_new):
        t = int(steps[-1].argmax())
        tokens.append(t)
        if step == n_new - 1:
            break
        out = model(input_ids=torch.tensor([[t]]), use_cache=True, **{cache_kw: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
        steps.append(out.logits[0, -1].float().numpy())
    return prompt_logits, tokens, steps


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Max |difference|, that relative to the largest |reference| logit, and arg-max agreement."""
    ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
    diff = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max()) or 1.0
    agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return {"max_abs_diff": round(diff, 6), "max_rel_diff": round(diff / scale, 6), "argmax_agree": round(agree, 4)}


def compare_tokens(ref: list[int], got: list[int]) -> dict[str, Any]:
    """Both greedy continuations, whether they are equal, and how many leading tokens agree."""
    prefix = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
    return {"reference": ref, "export": got, "greedy_equal": ref == got, "greedy_agree_prefix": prefix}


def check_gguf(path: str | os.PathLike, model: torch.nn.Module, tokenizer: Any, *, prompt: str, n_tokens: int,
               quant: str, threads: int = 0) -> dict[str, Any]:
    """llama.cpp vs transformers on the check prompt (skipped, saying why, without llama-cpp-python)."""
    if not llamacpp_available():
        return {"runtime": "llama.cpp", "skipped": "llama-cpp-python is not installed (pip install slimtune[llamacpp])",
                "passed": None}
    ids, messages = check_prompt_ids(tokenizer, prompt)
    ref_logits, ref_tokens, _ = reference(model, ids, n_tokens)
    lm = LlamaCppModel(path, n_threads=threads, n_ctx=len(ids) + n_tokens + 8, logits_all=True)
    try:
        own_ids = lm.chat_ids(messages) if messages is not None else lm.tokenize(prompt)
        logits = compare_logits(ref_logits, lm.logits(ids))
        gen, _ = lm.generate(ids, SamplingConfig(max_new_tokens=n_tokens), stop_at_eos=False)
    finally:
        lm.close()
    tokens = compare_tokens(ref_tokens, gen.token_ids)
    lossless = quant in LOSSLESS
    passed = own_ids == ids and (tokens["greedy_equal"] or not lossless)
    return {"runtime": "llama.cpp", "llama_cpp_python": llamacpp_version(), "prompt_tokens": len(ids),
            "chat_template": messages is not None, "tokens_equal": own_ids == ids,
            **({} if own_ids == ids else {"llama_cpp_tokens": own_ids, "hf_tokens": ids}),
            "logits": logits, **tokens, "threads": threads or "default",
            "criterion": "tokens equal and greedy equal" if lossless else "tokens equal (lossy type: figures recorded)",
            "passed": passed}


def check_onnx(folder: str | os.PathLike, model: torch.nn.Module, tokenizer: Any, task: str, *, prompt: str,
               n_tokens: int, threads: int = 0) -> dict[str, Any]:
    """onnxruntime vs transformers: decoders through their past key values, encoders on the prompt."""
    folder = Path(folder)
    if task == "classification":
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            ref = model(**enc).logits.float().numpy()
        got = load_onnx_classifier(folder, threads or None)(enc["input_ids"], enc["attention_mask"],
                                                              enc.get("token_type_ids")).numpy()
        logits = compare_logits(ref, got)
        return {"runtime": "onnxruntime", "logits": logits, "label_equal": logits["argmax_agree"] == 1.0,
                "criterion": "same class, logits within 1e-3 relative",
                "passed": logits["argmax_agree"] == 1.0 and logits["max_rel_diff"] < 1e-3}
    ids, _ = check_prompt_ids(tokenizer, prompt)
    ref_logits, ref_tokens, ref_steps = reference(model, ids, n_tokens)
    dec = OnnxDecoder(folder / "model.onnx", threads)
    got_tokens, got_steps = dec.greedy([ids], n_tokens)
    prefill = compare_logits(ref_logits[-1:], got_steps[0])
    n = min(len(ref_steps), len(got_steps))
    steps = compare_logits(np.stack(ref_steps[:n]), np.concatenate(got_steps[:n]))
    tokens = compare_tokens(ref_tokens, got_tokens[0])
    return {"runtime": "onnxruntime", "prompt_tokens": len(ids), "prefill_logits": prefill,
            "decode_logits": steps, **tokens, "criterion": "greedy equal, logits within 1e-3 relative",
            "passed": tokens["greedy_equal"] and steps["max_rel_diff"] < 1e-3}


def check_safetensors(folder: str | os.PathLike, model: torch.nn.Module, tokenizer: Any, task: str, *, prompt: str,
                      n_tokens: int, quant: str) -> dict[str, Any]:
    """The folder reloaded by plain transformers (no slimtune code) vs the model it was made from."""
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    same_tokens = tok(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    if task == "classification":
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            logits = compare_logits(model(**enc).logits.numpy(), reloaded(**enc).logits.numpy())
        ok = same_tokens and logits["argmax_agree"] == 1.0 and (quant != "f32" or logits["max_abs_diff"] == 0)
        return {"runtime": "transformers", "class": type(reloaded).__name__, "tokens_equal": same_tokens,
                "logits": logits, "criterion": "same class (f32: identical logits)", "passed": ok}
    ids, _ = check_prompt_ids(tokenizer, prompt)
    ref_logits, ref_tokens, _ = reference(model, ids, n_tokens)
    got_logits, got_tokens, _ = reference(reloaded, ids, n_tokens)
    tokens = compare_tokens(ref_tokens, got_tokens)
    logits = compare_logits(ref_logits, got_logits)
    ok = same_tokens and (quant != "f32" or (tokens["greedy_equal"] and logits["max_abs_diff"] == 0))
    return {"runtime": "transformers", "class": type(reloaded).__name__, "prompt_tokens": len(ids),
            "tokens_equal": same_tokens, "logits": logits, **tokens, "criterion": "tokens equal (f32: identical logits and greedy tokens)",
            "passed": ok}


def list_files(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every file of ``folder`` (recursively) with its size in bytes."""
    root = Path(folder)
    return [{"name": str(p.relative_to(root)), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file()]
