"""The settings of ``slimtune prune`` (one dataclass, its flags derive from it) and their checks.

One command prunes both kinds of model the folder says it holds (``config.json``):

- a fine-tuned sequence *classifier* (BERT family): :mod:`slimtune.compress.prune.recipe`;
- a *causal LM* (Llama family): :mod:`slimtune.compress.prune.decoder_recipe`; it stays a causal
  LM. Options that only one kind supports are refused for the other with the reason, before any
  weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from slimtune.compress.inputs import (
    DECODER_ALIASES,
    causal_lm_reason,
    check_classifier_model,
    check_file,
)
from slimtune.compress.prune.decoder_arch import (
    DecoderPruneError,
    check_decoder_config,
    head_layout,
)
from slimtune.compress.prune.decoder_width import plan_kv_groups
from slimtune.compress.prune.structured import HEADS_UNSUPPORTED
from slimtune.config.fields import RecipeError, check_ranges, setting
from slimtune.config.outputs import check_output
from slimtune.methods.magnitude import parse_pattern
from slimtune.models.loading import ALIASES, ModelError, check_exists

SETTINGS_FILE = "prune.yaml"  # the resolved settings, beside the artifacts; `--config` reads it back
DECODER_BATCH_SIZE = 8
"""Recovery / calibration batch of decoders when --batch-size is not given (classifiers: 32)."""
DECODER_RECOVERY_LR = 1e-4
"""Recovery lr of decoders when --lr is not given: on SmolLM2 30 -> 24 layers, 40 steps of KD on the
answers, dev exact match 0.75 at 1e-4 vs 0.69 at 3e-4 (unpruned 0.77); full fine-tuning's causal-LM
default (5e-5) is meant for hundreds of steps, a recovery has tens."""


@dataclass
class PruneSettings:
    """Everything ``slimtune prune`` does; saved as ``prune.yaml`` (and ``prune.json``) beside the output.

    The same dataclass is the ``prune:`` section of a ``slimtune run`` recipe: the pipeline fills
    ``model``/``output`` itself, and ``train``/``eval``/``max_length``/``max_train_samples``/
    ``max_eval_samples``/``seed`` from the shared sections when the section does not set them.
    """

    PIPELINE_FILLS: ClassVar[tuple[str, ...]] = ("model", "output", "overwrite")  # slimtune run sets these

    model: str | None = setting(None, "Fine-tuned classifier or causal-LM folder, or a packaged alias (minilm, minilm-l3, smollm2); required (the pipeline fills in the previous stage's folder). A causal LM stays a causal LM.")
    output: str | None = setting(None, "Output folder, replaced atomically when complete; required (the pipeline fills in the stage folder).")
    overwrite: bool = setting(False, "Replace an output folder that already holds a slimtune result (without it that is an error; a folder holding other files is never replaced).")
    train: str | None = setting(None, "Training file: recovery training, importance and layer choice (pipeline: data.train). Decoders: chat/instruction JSONL (answer-only loss) or .txt.")
    eval: str | None = setting(None, "Evaluation file for metrics.json (pipeline: data.eval): accuracy for classifiers; perplexity (and exact match / accuracy on chat data) for decoders.")
    sparsity: float = setting(0.0, "Unstructured magnitude sparsity of the block weights (0.5 = half zeros; zeros do not shrink model.safetensors). Classifiers only.", ge=0, lt=1)
    pattern: str = setting("unstructured", "'unstructured' or N:M such as 2:4 (GPU sparse tensor cores only). Classifiers only.")
    scope: Literal["global", "layer"] = setting("global", "One magnitude threshold for all layers, or the same sparsity per layer.")
    schedule: Literal["gradual", "oneshot"] = setting("gradual", "Cubic schedule over the recovery steps, or all at once.")
    heads: float = setting(0.0, "Fraction of attention heads removed in every layer. Decoders: whole KV groups with their query heads (grouped-query attention). Refused for BERT-family classifiers (plain transformers cannot reload fewer heads per layer: use --layers).", ge=0, lt=1)
    ffn: float = setting(0.0, "Fraction of FFN neurons removed in every layer.", ge=0, lt=1)
    layers: int = setting(0, "Number of whole layers to remove (classifiers: chosen greedily by logit change; decoders: lowest block influence, ShortGPT).", ge=0)
    keep_layers: float = setting(0.0, "Layers to keep instead of --layers: a count (24) or a fraction of them (0.8); 0: --layers decides.", ge=0)
    importance: Literal["auto", "taylor", "magnitude", "activation"] = setting("auto", "How FFN neurons (and decoder KV groups) are ranked. auto: taylor for classifiers, activation for decoders (mean |activation| x output-weight norm on calibration tokens).")
    importance_batches: int = setting(8, "Training batches used for importance and the layer choice (decoders: calibration batches).", ge=1)
    vocab: bool = setting(False, "Keep only the tokens the task uses: --train (decoders: --train and --eval as the model sees them, chat template rendered), plus --vocab-from.")
    vocab_from: list[str] = setting([], "Keep only the tokens used in these files (+ specials).", metavar="FILE")
    vocab_min_count: int = setting(1, "Drop tokens seen fewer times (1 keeps corpus tokenization identical). Classifiers only.", ge=1)
    vocab_keep_chars: bool = setting(True, "Keep single ASCII characters for unseen words (--no-vocab-chars drops them). Classifiers; decoders always keep the 256 byte-level tokens.", flag="--vocab-chars")
    vocab_top: int = setting(0, "Decoders: also keep the first N tokens of the BPE vocabulary (its most frequent), so text outside the task files keeps more of its tokenization.", ge=0)
    recover_steps: int = setting(0, "Recovery training steps after pruning.", ge=0)
    kd: bool = setting(False, "Distil from the unpruned model during recovery (logit KL; causal KD for decoders).")
    kd_temperature: float = setting(2.0, "Softmax temperature of the KD term.", gt=0)
    kd_alpha: float = setting(0.5, "Weight of the KD term (1 - alpha on cross-entropy).", ge=0, le=1)
    kd_positions: Literal["answer", "all"] = setting("answer", "Decoders: the KD term where the task loss is (answer: the answer tokens of chat data, every token of raw text) or on every position whose next token is real (all: the prompts too).")
    lr: float | None = setting(None, "Recovery learning rate (None: classifiers the recovery method's declared default, full 1e-4; decoders 1e-4, measured on SmolLM2, see docs/pruning.md).", gt=0)
    batch_size: int | None = setting(None, "Recovery (and importance) batch size (None: 32 for classifiers, 8 for decoders).", ge=1)
    max_length: int = setting(128, "Tokens per example.", ge=1)
    max_train_samples: int | None = setting(None, "Use N rows of --train only.", ge=1)
    max_eval_samples: int | None = setting(None, "Evaluate on N rows of --eval only.", ge=1)
    seed: int = setting(42, "Random seed.")
    num_threads: int = setting(0, "torch intra-op threads (0: torch's default).", ge=0)
    sparse_sidecar: Literal["auto", "on", "off"] = setting("auto", "Bitmask copy of sparse weights under sparse/ (auto: only when smaller).")

    def vocab_files(self) -> list[str]:
        """The corpus files whose tokens a classifier keeps: ``vocab_from``, plus ``train`` with ``vocab``."""
        extra = [self.train] if self.vocab and self.train and self.train not in self.vocab_from else []
        return [*self.vocab_from, *extra]

    def decoder_vocab_files(self) -> list[str]:
        """The files whose tokens a decoder keeps: ``vocab_from``, plus ``train`` and ``eval`` with ``vocab``."""
        extra = [f for f in (self.train, self.eval) if f] if self.vocab else []
        return list(dict.fromkeys([*self.vocab_from, *extra]))

    def batch(self, decoder: bool) -> int:
        """The batch size in effect (``batch_size``, else the default of the model kind)."""
        return self.batch_size or (DECODER_BATCH_SIZE if decoder else 32)

    def layers_to_remove(self, n_layers: int) -> int:
        """How many of ``n_layers`` layers go (from ``layers`` or ``keep_layers``); errors name the flag."""
        if not self.keep_layers:
            return self.layers
        k = self.keep_layers
        if k >= 1:
            if not float(k).is_integer():
                raise RecipeError(f"--keep-layers {k:g}: a count of layers is a whole number (or give a fraction < 1)")
            keep = int(k)
        else:
            keep = max(1, round(n_layers * k))
        if keep > n_layers:
            raise RecipeError(f"--keep-layers {k:g}: the model has only {n_layers} layers")
        return n_layers - keep

    def is_decoder(self) -> bool:
        """True when ``model`` names a causal LM (a decoder alias, or a folder whose config says so)."""
        if not self.model:
            return False
        if self.model in DECODER_ALIASES:
            return True
        config = _read_config(self.model)
        return config is not None and causal_lm_reason(config) is not None

    def validate(self, *, check_model: bool = True, decoder: bool | None = None) -> None:
        """Check ranges, combinations, files and the model before any weight is loaded (errors name the flag).

        Args:
            check_model: Also require ``model``/``output`` and check the model (the pipeline
                validates its recipe before the previous stage's folder exists).
            decoder: Without ``check_model``: whether the model will be a causal LM (the
                pipeline knows its task); None: a classifier.
        """
        check_ranges(self, "--")
        decoder = self.is_decoder() if check_model else bool(decoder)
        if check_model:
            self._check_model_and_output(decoder)
        if self.layers and self.keep_layers:
            raise RecipeError("--layers and --keep-layers both say how deep to prune: give one")
        if decoder:
            self._check_decoder_options()
        else:
            self._check_classifier_options()
        for flag, path in (("--train", self.train), ("--eval", self.eval), *(("--vocab-from", v) for v in self.vocab_from)):
            check_file(flag, path)

    def _check_classifier_options(self) -> None:
        if self.heads:
            raise RecipeError(f"--heads: {HEADS_UNSUPPORTED}")
        if self.importance == "activation":
            raise RecipeError("--importance activation: ranks decoder (causal LM) units; classifiers use taylor or magnitude")
        if self.kd_positions != "answer":
            raise RecipeError("--kd-positions: is for decoders (a classifier has one position)")
        if self.vocab_top:
            raise RecipeError("--vocab-top: is for decoders (byte-level BPE); classifiers keep single characters (--vocab-chars)")
        try:
            parse_pattern(self.pattern)
        except RecipeError as e:
            raise RecipeError(str(e).replace("method.pattern", "--pattern")) from None
        if self.vocab and not self.train:
            raise RecipeError("--vocab keeps the tokens of --train: give --train FILE (or --vocab-from FILE)")
        deep = self.layers or self.keep_layers
        needs_train = self.recover_steps > 0 or deep or (self.ffn and self.importance in ("taylor", "auto"))
        if needs_train and not self.train:
            raise RecipeError("--train is required for recovery training and taylor importance")
        if not (self.sparsity or deep or self.ffn or self.vocab_files() or self.pattern != "unstructured"):
            raise RecipeError("nothing to prune: give --sparsity, --pattern, --layers, --ffn, --vocab or --vocab-from")
        if self.kd and self.recover_steps == 0:
            raise RecipeError("--kd distils during recovery training: also give --recover-steps N")

    def _check_decoder_options(self) -> None:
        if self.sparsity or self.pattern != "unstructured":
            what = f"a causal language model ({self.model})" if self.model in ALIASES else \
                causal_lm_reason(_read_config(self.model) or {}) or "a causal language model"
            raise RecipeError(f"--model {self.model}: {what}; --sparsity/--pattern prune sequence classifiers only "
                              f"(unstructured zeros neither shrink nor speed up a decoder on CPU); a decoder is pruned "
                              f"by depth (--layers/--keep-layers), width (--ffn, --heads) and vocabulary (--vocab)")
        if self.vocab_min_count != 1:
            raise RecipeError("--vocab-min-count: decoders keep every task token (their tokenization stays exact); drop it")
        if not self.vocab_keep_chars:
            raise RecipeError("--no-vocab-chars: decoders always keep the 256 byte-level base tokens (any text still encodes)")
        if self.vocab and not (self.train or self.eval):
            raise RecipeError("--vocab keeps the tokens of --train and --eval: give them (or --vocab-from FILE)")
        deep = self.layers or self.keep_layers
        wide = self.ffn or self.heads
        needs_train = self.recover_steps > 0 or deep or (wide and self.importance != "magnitude")
        if needs_train and not self.train:
            raise RecipeError("--train is required for recovery training and for the decoder importance "
                              "(block influence, activations: calibration tokens)")
        if not (deep or wide or self.decoder_vocab_files() or self.vocab_top):
            raise RecipeError("nothing to prune: give --layers/--keep-layers, --ffn, --heads or --vocab (--vocab-from)")
        if self.vocab_top and not self.decoder_vocab_files():
            raise RecipeError("--vocab-top adds to the task tokens: also give --vocab (or --vocab-from FILE)")
        if self.kd and self.recover_steps == 0:
            raise RecipeError("--kd distils during recovery training: also give --recover-steps N")
        config = _read_config(self.model) if self.model and self.model not in ALIASES else None
        if config is not None:  # an alias is checked once resolved (its folder may not be built yet)
            check_decoder_plan(self, config)

    def _check_model_and_output(self, decoder: bool) -> None:
        if not self.model:
            raise RecipeError("--model: is required (the classifier or causal-LM folder or alias to prune)")
        if not self.output:
            raise RecipeError("--output: is required (the folder to write)")
        if decoder:
            check_exists(self.model)
        else:
            check_classifier_model(self.model, "prune")
        out = Path(self.output)
        if out.exists() and not out.is_dir():
            raise RecipeError(f"--output {out}: exists and is not a folder")
        if Path(self.model).exists() and out.resolve() == Path(self.model).resolve():
            raise RecipeError("--output must differ from --model (the unpruned model is read while the output is written)")
        check_output(out, overwrite=self.overwrite)


def _read_config(name: str) -> dict[str, Any] | None:
    """``config.json`` of a model folder as a dict (None for an alias or a name that is no folder)."""
    p = Path(name) / "config.json"
    if name in ALIASES or not p.is_file():
        return None
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelError(f"{p}: invalid JSON ({e})") from None
    return config if isinstance(config, dict) else None


def check_decoder_plan(s: PruneSettings, config: dict[str, Any]) -> None:
    """The depth/width asked for fits the decoder ``config`` (a dict); RecipeError names the flag."""
    try:
        check_decoder_config(config, s.model or "")
    except DecoderPruneError as e:
        raise RecipeError(str(e)) from None
    n = int(config.get("num_hidden_layers") or 0)
    if s.layers_to_remove(n) >= n:
        raise RecipeError(f"--layers: can remove 0..{n - 1} of {n} layers, got {s.layers}")
    heads, kv, _ = head_layout(config)
    if s.heads:
        kept = plan_kv_groups(kv, s.heads)
        if kept == kv:
            raise RecipeError(f"--heads {s.heads}: removes no KV group ({kv} groups of {heads // kv} query heads; "
                              f"one group is {1 / kv:.2f} of the heads)")
