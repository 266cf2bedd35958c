"""Export a model folder to GGUF (llama.cpp), ONNX (onnxruntime) or a clean safetensors folder, and check it.

  slimtune export --model OUT --format gguf --quant q8_0 --output OUT-gguf
  slimtune export --model OUT/adapter --format safetensors --output OUT-merged
  slimtune export --model OUT --format onnx --output OUT-onnx

OUT is any folder slimtune writes (merged model, base + PEFT adapter folder, a method's own
format, a quantized folder decoded to float), a plain transformers folder, or an alias
(smollm2). GGUF holds Llama decoders (weights, byte-level BPE tokenizer, chat template); ONNX a
decoder with past key values or an encoder classifier; safetensors any task model. What a format
cannot hold is refused (exit 2) before a weight loads. OUT/export.json records what was written
and the check against transformers on --check-prompt (see docs/export.md); OUT/export.yaml holds
the settings (--config repeats the run).
"""

from __future__ import annotations

import argparse
import sys

from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings
from slimtune.export.run import SETTINGS_FILE, format_summary, run_export
from slimtune.export.settings import EXPORT_JSON, ExportSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune export``: ``--config``, one flag per :class:`ExportSettings` field, ``--print-config``."""
    add_settings_arguments(p, ExportSettings)


def run(args: argparse.Namespace) -> int:
    """``slimtune export`` entry point."""
    st = resolve_settings(ExportSettings, args, "export")
    if print_config(args, st):
        return 0
    report = run_export(st)
    print(format_summary(report))
    print(f"wrote {st.output} ({EXPORT_JSON}, {SETTINGS_FILE})")
    if report["passed"] is False:
        print(f"slimtune export: warning: the check did not pass ({report['check']['criterion']}); "
              f"see {st.output}/{EXPORT_JSON}", file=sys.stderr)
    return 0
