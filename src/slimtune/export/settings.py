"""``ExportSettings``: everything ``slimtune export`` does, declared once.

The dataclass is the source of the command's flags, is validated before any weight loads
(what a format cannot hold is refused here, read from ``config.json``), and is saved as
``OUT/export.yaml``, which ``--config`` reads back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slimtune.config.fields import RecipeError, check_ranges, setting
from slimtune.config.outputs import check_output
from slimtune.export.source import inspect_source

FORMATS = ("gguf", "onnx", "safetensors")
# What each format can store: GGUF every type the gguf package quantizes; ONNX float32 graphs
# (int8 ONNX is `slimtune quantize`); safetensors a float dtype.
FORMAT_QUANTS: dict[str, tuple[str, ...]] = {
    "gguf": ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"),
    "onnx": ("f32",),
    "safetensors": ("f32", "f16", "bf16"),
}
DEFAULT_QUANT = {"gguf": "f16", "onnx": "f32", "safetensors": "f32"}
EXPORT_JSON = "export.json"


@dataclass
class ExportSettings:
    """Everything ``slimtune export`` does; saved as ``export.yaml`` in the output folder."""

    model: str | None = setting(None, "Model folder slimtune wrote (merged model, a base + PEFT adapter folder such as OUT/adapter, a method's own format, a quantized folder), a plain transformers folder, or an alias (smollm2, minilm). Required.", metavar="DIR")
    adapter: str | None = setting(None, "A PEFT adapter folder merged into --model before export.", metavar="DIR")
    format: Literal["gguf", "onnx", "safetensors"] | None = setting(None, "gguf: a Llama decoder for llama.cpp (weights, tokenizer, chat template); onnx: a decoder with past key values, or an encoder classifier, for onnxruntime; safetensors: a clean merged folder for plain transformers. Required.")
    quant: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] | None = setting(None, "Weight type. gguf: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (a matrix whose rows are not whole 32-value blocks falls back to f16, listed in export.json); onnx: f32; safetensors: f32, f16, bf16. None: gguf f16, else f32.")
    output: str | None = setting(None, "Output folder, written aside and swapped in whole when complete. Required.", metavar="DIR")
    overwrite: bool = setting(False, "Replace an output folder that already holds a slimtune result (a folder holding other files is never replaced).")
    embedding_quant: Literal["auto", "f32", "f16", "q8_0"] = setting("auto", "gguf: type of the token embedding and the output projection (one matrix when tied). auto: q8_0 under a 4- or 5-bit --quant (as llama.cpp's own 4-bit files keep that matrix at >= 6 bits), else the --quant type.")
    pre_tokenizer: str | None = setting(None, "gguf: llama.cpp pre-tokenizer name (tokenizer.ggml.pre); None: read from tokenizer.json (byte-level BPE: gpt-2, smollm, llama-bpe, qwen2), refused when unknown.")
    check: bool = setting(True, "Check the export against transformers (logits and greedy tokens on --check-prompt) and record it in export.json; --no-check writes the files only.")
    check_prompt: str = setting("The quick brown fox jumps over the lazy dog. Is 12 + 30 = 42? Yes, it's 42!", "Text the check runs (a user message through the chat template when the tokenizer has one).")
    check_tokens: int = setting(16, "Greedy tokens compared by the check.", ge=1)
    threads: int = setting(0, "CPU threads of the llama.cpp / onnxruntime check (0: the runtime's default).", ge=0)
    opset: int = setting(18, "onnx: ONNX opset of the decoder graph (encoders: the quantize exporter's own, 17).", ge=18)
    onnx_exporter: Literal["legacy", "dynamo"] = setting("legacy", "onnx decoders: torch.onnx's TorchScript tracer (seconds) or the dynamo exporter (torch.export; minutes on a small CPU); both are checked the same way.")

    @property
    def resolved_quant(self) -> str:
        """The weight type this run writes (the format's default when --quant is not given)."""
        return self.quant or DEFAULT_QUANT[self.format or "gguf"]

    def validate(self) -> None:
        """Check the flags, the model folder (read cheaply: no weights) and the output folder.

        Raises:
            RecipeError: a missing or contradicting flag, or a model the format cannot hold.
            ModelError: a model folder that cannot be read.
        """
        check_ranges(self, "--")
        for flag, value in (("--model", self.model), ("--format", self.format), ("--output", self.output)):
            if not value:
                raise RecipeError(f"{flag}: is required")
        fmt = str(self.format)
        if self.resolved_quant not in FORMAT_QUANTS[fmt]:
            extra = "; int8 ONNX is `slimtune quantize`" if fmt == "onnx" else ""
            raise RecipeError(f"--quant {self.quant}: --format {fmt} stores {', '.join(FORMAT_QUANTS[fmt])}{extra}")
        if fmt != "onnx" and self.onnx_exporter != "legacy":
            raise RecipeError("--onnx-exporter: applies to --format onnx only")
        if fmt != "gguf" and (self.embedding_quant != "auto" or self.pre_tokenizer is not None):
            flag = "--embedding-quant" if self.embedding_quant != "auto" else "--pre-tokenizer"
            raise RecipeError(f"{flag}: applies to --format gguf only")
        info = inspect_source(str(self.model), self.adapter)
        refusal = info.refusal(fmt)
        if refusal:
            raise RecipeError(f"--model {self.model}: {refusal}")
        out = Path(str(self.output))
        for src in (self.model, self.adapter):
            if src and Path(src).exists() and out.resolve() == Path(src).resolve():
                raise RecipeError(f"--output {out}: is also the input {src}; write to another folder")
        state = check_output(out, overwrite=self.overwrite)
        if state != "new" and (out / EXPORT_JSON).is_file() and not self.overwrite:
            raise RecipeError(f"--output {out}: holds a finished export ({EXPORT_JSON}); pass --overwrite to "
                              "replace it, or choose a new --output")
