"""``slimtune bench`` settings, also the ``bench:`` section of a pipeline recipe.

One dataclass for both: the command takes every field as a flag; in ``slimtune run`` the
pipeline fills ``model`` (every model of the run) and ``output`` (the stage folder) itself, so a
recipe leaves them out (:data:`BenchSettings.PIPELINE_FILLS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from slimtune.compress.inputs import is_causal_lm_folder
from slimtune.config.fields import RecipeError, check_ranges, setting


def field_key(prefix: str, name: str) -> str:
    """How an error names a field: ``--seq-lens`` for a command (prefix ``--``), else ``bench.seq_lens``."""
    return "--" + name.replace("_", "-") if prefix.startswith("--") else f"{prefix}.{name}"


@dataclass
class BenchSettings:
    """Which model folders to time, on which grid of settings, and where the result goes."""

    PIPELINE_FILLS: ClassVar[tuple[str, ...]] = ("model", "output")

    model: list[str] | None = setting(None, "Model folders (fp32 HF, pruned, quantized, ONNX); the first is the reference of the ratios. Required by slimtune bench.", metavar="DIR")
    batch_sizes: list[int] = setting([1], "Batch sizes, comma-separated.", ge=1, metavar="N[,N...]")
    seq_lens: list[int] = setting([128], "Sequence lengths (tokens of real text), comma-separated.", ge=1, metavar="N[,N...]")
    threads: list[int] = setting([1], "Intra-op thread counts, comma-separated.", ge=1, metavar="N[,N...]")
    repeats: int = setting(30, "Interleaved timing rounds per setting.", ge=1)
    warmup: int = setting(5, "Untimed calls per model before timing.", ge=0)
    min_seconds: float = setting(0.0, "Keep timing each setting at least this long (more rounds than --repeats when needed).", ge=0)
    eval: str | None = setting(None, "Labelled file: also report accuracy/macro-F1 of each model.", metavar="FILE")
    max_eval_samples: int | None = setting(None, "Evaluate on N rows of --eval only (a seeded sample).", ge=1)
    output: str | None = setting(None, "Write the full result as JSON here (and the settings beside it).", metavar="JSON")

    def validate(self, prefix: str = "--") -> None:
        """Ranges, non-empty grids, and the files named (before any model loads).

        Args:
            prefix: ``"--"`` names flags in errors; a section name (``bench``) names recipe keys.
        """
        check_ranges(self, prefix)
        for name in ("batch_sizes", "seq_lens", "threads"):
            if not getattr(self, name):
                raise RecipeError(f"{field_key(prefix, name)}: give at least one value")
        if self.eval is not None and not Path(self.eval).is_file():
            raise RecipeError(f"{field_key(prefix, 'eval')}: file not found: {self.eval}")
        causal = []
        for d in self.model or []:
            if not (Path(d) / "config.json").is_file():
                raise RecipeError(f"{field_key(prefix, 'model')}: not a model folder (no config.json): {d}")
            causal.append(is_causal_lm_folder(d))
        if any(causal) and not all(causal):  # never time a decoder as a classifier (a fresh head)
            d = next(d for d, c in zip(self.model or [], causal, strict=True) if c)
            raise RecipeError(f"{field_key(prefix, 'model')} {d}: a causal LM among classifiers; bench decoders "
                              f"(prefill latency, decode tokens/s) and classifiers in separate runs")
        if any(causal) and self.eval is not None:
            raise RecipeError(f"{field_key(prefix, 'eval')}: accuracy inside bench is for classifiers; a causal LM's "
                              f"task metrics come from slimtune evaluate (exact match, answer perplexity)")
