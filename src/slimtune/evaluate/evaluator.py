"""Evaluation: accuracy, macro-F1 and a per-class report for classifiers; perplexity for LMs.

Metrics are computed in code (``evaluate.load`` needs the hub). Evaluation batches are sorted
by length, so padding costs almost nothing, and predictions are put back in file order.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from slimtune.config.fields import RecipeError, check_ranges, setting
from slimtune.data.chat import ChatRenderer, is_chat_data, load_chat, references, tokenize_chat
from slimtune.data.datasets import (
    load_classification,
    read_text_files,
    tokenize_causal,
    tokenize_classification,
)
from slimtune.evaluate.generation import evaluate_chat_file
from slimtune.evaluate.llamacpp import evaluate_chat_llamacpp, llamacpp_perplexity
from slimtune.evaluate.metrics import (  # re-exported: the evaluation API of this module
    classification_metrics,
    evaluate_causal_lm,
    evaluate_classifier,
)
from slimtune.io import update_json, weights_size_mb
from slimtune.models.loading import (
    ALIASES,
    ModelError,
    count_params,
    label_names_of,
    load_model,
    load_tokenizer,
    resolve,
)
from slimtune.runtime.classifier import load_predict
from slimtune.runtime.folders import count_stored_params, model_kind
from slimtune.runtime.generate import load_for_generation
from slimtune.runtime.gguf_folder import GGUF_FILE, is_gguf_folder, open_gguf_folder
from slimtune.runtime.llamacpp import LlamaCppModel
from slimtune.runtime.predict import predict_all


def format_report(metrics: dict[str, Any], title: str = "") -> str:
    """A plain-text table: per-class precision/recall/F1/support, then the summary line."""
    lines = [title] if title else []
    if "per_class" in metrics:
        w = max(10, *(len(n) for n in metrics["per_class"]))
        lines.append(f"{'class':<{w}}  precision  recall     f1  support")
        for name, m in metrics["per_class"].items():
            lines.append(f"{name:<{w}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:5.4f}  {m['support']:7d}")
        lines.append(f"{'accuracy':<{w}}  {metrics['accuracy']:.4f}   macro-F1 {metrics['macro_f1']:.4f}   n={metrics['n']}")
    if "perplexity" in metrics:
        what = " (answer tokens)" if "answer_perplexity" in metrics else ""
        lines.append(f"perplexity{what} {metrics['perplexity']:.3f}   loss {metrics['loss']:.4f}   tokens {metrics['tokens']}")
    if "exact_match" in metrics:  # chat/instruction eval (slimtune.evaluate.generation)
        lines.append(f"exact match {metrics['exact_match']:.4f}   generated {metrics['generated']} answers")
    for sample in metrics.get("samples", [])[:3]:
        lines.append(f"  prompt: {sample['prompt'][:80]!r}\n    reference: {sample['reference'][:80]!r}\n"
                     f"    generated: {sample['generated'][:80]!r}")
    return "\n".join(lines)


def model_task(model_dir: str) -> str:
    """'causal-lm' or 'classification', read from a saved model's config.json."""

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    return "causal-lm" if any(a.endswith("ForCausalLM") for a in archs) else "classification"


@dataclass
class EvaluateSettings:
    """``slimtune evaluate`` settings, also the ``evaluate:`` section of a pipeline recipe.

    In ``slimtune run`` the pipeline fills ``model`` (every model of the run) and ``output``
    (``evaluation.json`` in the stage folder), and ``eval`` defaults to ``data.eval``.
    """

    PIPELINE_FILLS: ClassVar[tuple[str, ...]] = ("model", "output")

    model: str | None = setting(None, "Model folder written by slimtune (or any HF folder, or a packaged alias with --output). Required by slimtune evaluate.", metavar="DIR")
    eval: str | None = setting(None, "Labelled evaluation file (CSV/TSV/JSONL), chat JSONL, or .txt for a causal LM. Required by slimtune evaluate; a pipeline defaults to data.eval (put the held-out test file here).", metavar="FILE")
    output: str | None = setting(None, "Metrics JSON to write (default: MODEL/metrics.json); the settings go beside it as OUTPUT.evaluate.yaml.", metavar="JSON")
    batch_size: int = setting(64, "Evaluation batch size (causal LMs: divided by 8).", ge=1)
    max_length: int | None = setting(None, "Tokens per example (default: the model's recipe.yaml, else 128; in a pipeline data.max_length).", ge=1)
    max_eval_samples: int | None = setting(None, "Evaluate on N rows only (a seeded sample of the file; causal-LM text: the first N blocks).", ge=1)
    text_column: str | None = setting(None, "Column with the text (default: the model's recipe.yaml, else auto-detected).")
    text_pair_column: str | None = setting(None, "Column with the second text of a pair (default: recipe.yaml, else auto-detected).")
    label_column: str | None = setting(None, "Column with the label (default: recipe.yaml, else auto-detected).")
    encoding: str | None = setting(None, "Text encoding of the file (default: recipe.yaml, else utf-8).")
    skip_bad_rows: bool = setting(False, "Skip malformed rows (and report how many) instead of stopping at the first.")

    def validate(self, prefix: str = "--") -> None:
        """Ranges and the files named, before any weight loads.

        Args:
            prefix: ``"--"`` names flags in errors; a section name (``evaluate``) names recipe keys.
        """
        check_ranges(self, prefix)

        def key(name: str) -> str:
            return "--" + name.replace("_", "-") if prefix.startswith("--") else f"{prefix}.{name}"

        if self.eval is not None and not Path(self.eval).is_file():
            raise RecipeError(f"{key('eval')}: file not found: {self.eval}")
        if self.model is not None and self.model not in ALIASES and not (Path(self.model) / "config.json").is_file():
            raise RecipeError(f"{key('model')}: not a model folder (no config.json): {self.model}")
        if self.model in ALIASES and self.output is None:
            raise RecipeError(f"{key('output')}: required when {key('model')} is a packaged alias ({self.model})")


def run_evaluate(model_dir: str, eval_path: str, *, output: str | None = None, batch_size: int = 64,
                 max_length: int | None = None, text_column: str | None = None,
                 text_pair_column: str | None = None, label_column: str | None = None,
                 encoding: str | None = None, skip_bad_rows: bool = False,
                 max_eval_samples: int | None = None) -> dict[str, Any]:
    """Evaluate a saved model folder on a file; write ``metrics.json`` (or ``output``).

    Defaults for max_length, columns and encoding come from the folder's ``recipe.yaml`` when
    present, so ``slimtune evaluate --model DIR --eval FILE`` repeats the training setup.
    ``max_eval_samples`` keeps N rows (a seeded sample; causal-LM text: the first N blocks).
    """

    if model_dir in ALIASES:  # e.g. the zero-shot baseline: slimtune evaluate --model smollm2
        if output is None:
            raise ModelError(f"--model {model_dir} is a packaged alias: pass --output for its metrics JSON")
        model_dir = resolve(model_dir)
    d: dict[str, Any] = {}
    recipe_path = Path(model_dir) / "recipe.yaml"
    if recipe_path.is_file():
        d = (yaml.safe_load(recipe_path.read_text()) or {}).get("data", {})
    max_length = max_length or d.get("max_length") or 128
    encoding = encoding or d.get("encoding") or "utf-8"
    task = model_task(model_dir)

    if task == "classification" and model_kind(model_dir) != "hf":  # ONNX / quantized folders

        result = evaluate_model_dir(model_dir, eval_path, max_length=max_length, batch_size=batch_size,
                                    text_column=text_column, text_pair_column=text_pair_column,
                                    label_column=label_column, encoding=encoding, skip_bad_rows=skip_bad_rows,
                                    max_eval_samples=max_eval_samples)
        result.update(params=count_stored_params(model_dir), size_mb=weights_size_mb(model_dir))
        update_json(output or Path(model_dir) / "metrics.json", result)
        return result
    if task == "causal-lm" and is_gguf_folder(model_dir):  # slimtune quantize chose llama.cpp
        result = _evaluate_gguf(model_dir, eval_path, d, max_length, encoding, skip_bad_rows, max_eval_samples)
        result.update(eval_file=str(eval_path), size_mb=weights_size_mb(model_dir), backend="llama.cpp")
        update_json(output or Path(model_dir) / "metrics.json", result)
        return result
    tok = load_tokenizer(model_dir)
    # causal LMs through load_for_generation: quantized decoders run on their int8/int4 kernels
    model = load_model(model_dir, task) if task == "classification" else load_for_generation(model_dir)[0]
    if task == "classification":
        names = label_names_of(model)
        if all(n == f"LABEL_{i}" for i, n in enumerate(names)):  # a config with no label names
            names = [str(i) for i in range(len(names))]
        data = load_classification(eval_path, text_column=text_column or d.get("text_column"),
                                   text_pair_column=text_pair_column or d.get("text_pair_column"),
                                   label_column=label_column or d.get("label_column"),
                                   label_names=names, skip_bad_rows=skip_bad_rows, encoding=encoding,
                                   max_rows=max_eval_samples)
        result = evaluate_classifier(model, tokenize_classification(data, tok, max_length), names, batch_size)
    elif is_chat_data(eval_path, d.get("format") or "auto", encoding):  # chat/instruction JSONL
        result = evaluate_chat_file(model, tok, eval_path, max_length=max_length, fmt=d.get("format") or "auto",
                                    template_mode=d.get("chat_template") or "auto", batch_size=max(1, batch_size // 8),
                                    skip_bad_rows=skip_bad_rows, encoding=encoding, max_rows=max_eval_samples)
    else:
        blocks = tokenize_causal(read_text_files(eval_path, encoding), tok, max_length)
        if max_eval_samples:
            blocks.input_ids = blocks.input_ids[:max_eval_samples]
        result = evaluate_causal_lm(model, blocks, max(1, batch_size // 8))
    result.update(eval_file=str(eval_path), params=count_params(model), size_mb=weights_size_mb(model_dir))
    update_json(output or Path(model_dir) / "metrics.json", result)
    return result


def _evaluate_gguf(model_dir: str, eval_path: str, d: dict[str, Any], max_length: int, encoding: str,
                   skip_bad_rows: bool, max_rows: int | None) -> dict[str, Any]:
    """Answer perplexity + exact match (chat) or token perplexity (text) of a GGUF folder, on the
    ids its HF tokenizer gives (the definitions of the torch path)."""
    tok = load_tokenizer(model_dir)

    def open_model(logits_all: bool, n_ctx: int) -> Any:
        return open_gguf_folder(model_dir, n_ctx=n_ctx)[0] if not logits_all else \
            LlamaCppModel(Path(model_dir) / GGUF_FILE, n_ctx=n_ctx, logits_all=True)

    if is_chat_data(eval_path, d.get("format") or "auto", encoding):
        chat = load_chat(eval_path, d.get("format") or "auto", skip_bad_rows=skip_bad_rows, encoding=encoding,
                         max_rows=max_rows)
        data = tokenize_chat(chat, tok, max_length, renderer=ChatRenderer(tok, d.get("chat_template") or "auto"))
        data.info["references"] = references(chat)
        return evaluate_chat_llamacpp(open_model, tok, data)
    blocks = tokenize_causal(read_text_files(eval_path, encoding), tok, max_length)
    if max_rows:
        blocks.input_ids = blocks.input_ids[:max_rows]
    m = open_model(True, max_length + 8)
    try:
        return llamacpp_perplexity(m, blocks)
    finally:
        m.close()


def evaluate_model_dir(model_dir: str | os.PathLike, eval_path: str, *, max_eval_samples: int | None = None,
                       max_length: int | None = None, batch_size: int = 64,
                       predict: Callable[[dict[str, Any]], Any] | None = None,
                       tokenizer: Any = None, text_column: str | None = None,
                       text_pair_column: str | None = None, label_column: str | None = None,
                       encoding: str | None = None, skip_bad_rows: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class report of any slimtune classifier folder on a file.

    Columns, encoding and max_length default to the folder's ``recipe.yaml`` (as in
    ``slimtune evaluate``); label names come from ``config.json`` ``id2label``.
    """

    if predict is None or tokenizer is None:
        predict, tokenizer = load_predict(model_dir)
    cfg = getattr(predict, "config", None) or {}
    if not cfg:

        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()}
    # transformers omits default LABEL_i names (and num_labels = 2) from config.json
    names = [id2label.get(i, f"LABEL_{i}") for i in range(len(id2label) or int(cfg.get("num_labels", 2)))]
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        names = [str(i) for i in range(len(names))]
    d: dict[str, Any] = {}
    if (Path(model_dir) / "recipe.yaml").is_file():
        d = (yaml.safe_load((Path(model_dir) / "recipe.yaml").read_text()) or {}).get("data", {}) or {}
    data = load_classification(eval_path, text_column=text_column or d.get("text_column"),
                               text_pair_column=text_pair_column or d.get("text_pair_column"),
                               label_column=label_column or d.get("label_column"), label_names=names,
                               encoding=encoding or d.get("encoding") or "utf-8", max_rows=max_eval_samples,
                               skip_bad_rows=skip_bad_rows)
    tdata = tokenize_classification(data, tokenizer, max_length or d.get("max_length") or 128)
    if tdata.labels is None:
        raise ValueError(f"{eval_path}: no labels to evaluate against")
    t0 = time.perf_counter()
    logits = predict_all(predict, tdata, batch_size)
    result = classification_metrics(logits.argmax(-1).tolist(), tdata.labels, names)
    result["eval_file"] = str(eval_path)
    result["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return result
