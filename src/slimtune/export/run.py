"""The export stage: load the source, write the format into a folder built aside, check it, swap it in.

``OUT`` ends up holding the artifact (``model.gguf``; ``model.onnx`` + config + tokenizer; or a
transformers folder), ``export.yaml`` (the resolved settings; ``--config`` repeats the run) and
``export.json``: what was exported from where, what was written (types, fallbacks, sizes) and
what the check measured (:mod:`slimtune.export.check`). Nothing is left half-written: the
folder is swapped in whole once complete (:func:`slimtune.io.atomic_dir`).
"""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path
from typing import Any

from slimtune.config.fields import RecipeError, save_settings
from slimtune.export.check import check_gguf, check_onnx, check_safetensors, list_files
from slimtune.export.gguf import GGUF_FILE, write_gguf
from slimtune.export.onnx import write_decoder_folder, write_encoder_folder
from slimtune.export.safetensors import write_safetensors_folder
from slimtune.export.settings import EXPORT_JSON, ExportSettings
from slimtune.export.source import Source, inspect_source, load_source, plain_model
from slimtune.io import atomic_dir, atomic_write_json

SETTINGS_FILE = "export.yaml"


def _versions(fmt: str) -> dict[str, str | None]:
    names = {"gguf": ("gguf", "llama_cpp_python"), "onnx": ("torch", "onnx", "onnxruntime"),
             "safetensors": ("transformers", "safetensors")}[fmt]
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def _write(src: Source, st: ExportSettings, tmp: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Write the format into ``tmp``; return (what was written, the check or None)."""
    fmt, quant, task = str(st.format), st.resolved_quant, src.task
    kw = {"prompt": st.check_prompt, "n_tokens": st.check_tokens}
    if fmt == "gguf":
        model = plain_model(src, fmt)
        name = Path(src.info.path).name or "model"
        written = write_gguf(model, src.tokenizer, tmp / GGUF_FILE, quant=quant, embedding_quant=st.embedding_quant,
                             pre_tokenizer=st.pre_tokenizer, name=name)
        check = check_gguf(tmp / GGUF_FILE, model, src.tokenizer, quant=quant, threads=st.threads, **kw) if st.check else None
    elif fmt == "onnx":
        model = src.model
        if task == "causal-lm":
            written = write_decoder_folder(model, src.tokenizer, tmp, st.opset, st.onnx_exporter)
        else:
            written = write_encoder_folder(model, src.tokenizer, tmp)
        check = check_onnx(tmp, model, src.tokenizer, task, threads=st.threads, **kw) if st.check else None
    else:
        model = plain_model(src, fmt)
        written = write_safetensors_folder(model, src.tokenizer, tmp, quant)
        check = check_safetensors(tmp, model, src.tokenizer, task, quant=quant, **kw) if st.check else None
    return written, check


def run_export(st: ExportSettings) -> dict[str, Any]:
    """Export ``st.model`` as ``st.format`` into ``st.output``; return what ``export.json`` holds.

    Raises:
        RecipeError: the loaded model is something the format cannot hold.
        ModelError: the model or its tokenizer cannot be loaded or stored.
    """
    t0 = time.perf_counter()
    src = load_source(inspect_source(str(st.model), st.adapter))
    refusal = src.info.refusal(str(st.format))
    if refusal:
        raise RecipeError(f"--model {st.model}: {refusal}")
    load_seconds = time.perf_counter() - t0
    out = Path(str(st.output))
    with atomic_dir(out) as tmp:
        t1 = time.perf_counter()
        written, check = _write(src, st, tmp)
        seconds = time.perf_counter() - t1
        save_settings(st, tmp / SETTINGS_FILE)
        report = {"format": st.format, "quant": st.resolved_quant, "task": src.task,
                  "source": {"model": st.model, "path": src.info.path, "kind": src.info.kind, "adapter": src.info.adapter,
                             "architecture": src.info.architecture},
                  "written": written, "check": check, "passed": None if check is None else check.get("passed"),
                  "load_seconds": round(load_seconds, 2), "export_seconds": round(seconds, 2),
                  "versions": _versions(str(st.format))}
        report["files"] = list_files(tmp)  # everything but export.json itself
        atomic_write_json(tmp / EXPORT_JSON, report)
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: what was written, its size, and what the check found."""
    files = report["files"]
    main = max(files, key=lambda f: f["bytes"])
    lines = [f"{report['format']} {report['quant']}: {main['name']} {main['bytes'] / 1e6:.1f} MB "
             f"({sum(f['bytes'] for f in files) / 1e6:.1f} MB in {len(files)} files), exported in "
             f"{report['export_seconds']:.1f} s"]
    fallbacks = (report["written"] or {}).get("fallbacks") or {}
    if fallbacks:
        lines.append(f"  {len(fallbacks)} tensor(s) fell back to another type (export.json written.fallbacks)")
    check = report["check"]
    if check is None:
        lines.append("  not checked (--no-check)")
    elif check.get("skipped"):
        lines.append(f"  check skipped: {check['skipped']}")
    else:
        parts = [f"{check['runtime']} vs transformers"]
        for key in ("logits", "decode_logits"):
            if key in check:
                parts.append(f"max |logit diff| {check[key]['max_abs_diff']:.3g}")
        if "greedy_equal" in check:
            parts.append(f"greedy {check['greedy_agree_prefix']}/{len(check['reference'])} tokens agree")
        if "tokens_equal" in check:
            parts.append("tokenizer " + ("equal" if check["tokens_equal"] else "DIFFERS"))
        lines.append("  " + ", ".join(parts) + (": passed" if check["passed"] else ": NOT passed (" + check["criterion"] + ")"))
    return "\n".join(lines)
