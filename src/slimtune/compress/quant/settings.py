"""``QuantizeSettings``: everything ``slimtune quantize`` does, declared once.

The same dataclass is the ``quantize:`` section of a ``slimtune run`` recipe (the pipeline fills
``model``/``output`` itself, and ``eval``/``train``/``max_eval_samples``/``max_length`` from the
shared ``data`` section when the section leaves them unset), the source of the command's flags
(:func:`slimtune.config.fields.add_flags`), and ``OUT/quantize.yaml``, which ``--config`` reads
back to repeat a run.

Scheme-dependent settings are ``None`` for "the scheme's default" (int8: per-channel symmetric;
int4: group-wise 32, asymmetric; nf4: blocks of 64; kmeans: 4 bits per channel); what was
applied is recorded in ``metrics.json`` (``config``, ``gates``). The parity gates
(``min_sqnr_db``, ``max_accuracy_drop``) apply to every scheme: default 20 dB / 0.5 pt for int8
and fp32 (they also pick the int8 backend), no gate for the weight-only formats unless given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from slimtune.compress.inputs import check_classifier_model, check_file, is_causal_lm_folder
from slimtune.compress.quant.api import Int4WeightConfig, Int8WeightConfig, KMeansConfig, NF4Config
from slimtune.compress.quant.backends import BACKENDS, int8_backend_gap
from slimtune.config.fields import RecipeError, check_ranges, setting
from slimtune.config.outputs import check_output
from slimtune.runtime.llamacpp import llamacpp_available

SCHEMES = ("int8", "int4", "nf4", "kmeans", "fp32")
WEIGHT_ONLY = ("int4", "nf4", "kmeans")
BACKEND_CHOICES = ("auto", *BACKENDS)
DEFAULT_MIN_SQNR_DB = 20.0
DEFAULT_MAX_ACCURACY_DROP = 0.5


class QuantizeError(RecipeError):
    """Bad arguments or inputs to ``slimtune quantize``, or a failed parity gate (one line, exit 2)."""


@dataclass
class QuantizeSettings:
    """Everything ``slimtune quantize`` does; saved as ``quantize.yaml`` beside the output."""

    PIPELINE_FILLS: ClassVar[tuple[str, ...]] = ("model", "output", "overwrite")  # slimtune run sets these

    model: str | None = setting(None, "Fine-tuned classifier folder (plain HF); required (the pipeline fills in the previous stage's folder).")
    output: str | None = setting(None, "Output folder, replaced atomically when complete; required (the pipeline fills in the stage folder).")
    overwrite: bool = setting(False, "Replace an output folder that already holds a slimtune result (without it that is an error; a folder holding other files is never replaced).")
    scheme: Literal["int8", "int4", "nf4", "kmeans", "fp32"] = setting("int8", "Quantization scheme: int8 (weights + dynamic activations on the fastest CPU backend), int4 / nf4 / kmeans (weight-only storage, decoded at load), fp32 (no quantization: the fused fp32 ONNX folder).")
    granularity: Literal["tensor", "channel", "group"] | None = setting(None, "Scale granularity (None: int8 channel, int4 group, kmeans channel; nf4 is block-wise). int8 backends run tensor or channel.")
    group_size: int | None = setting(None, "Weights per scale with group granularity (None: int4 32); nf4: block size (None: 64).", ge=2)
    bits: int | None = setting(None, "kmeans: code width, 2**bits centroids (None: 4).", ge=1, le=8)
    symmetric: bool | None = setting(None, "Zero point 0 (--symmetric) or min/max zero point (--asymmetric); None: int8 symmetric, int4 asymmetric.")
    include_embeddings: bool = setting(True, "Quantize the embedding tables too (--no-embeddings leaves them in float).", flag="--embeddings")
    backend: Literal["auto", "torch", "torchao", "onnxruntime", "llama.cpp"] = setting("auto", "int8 runtime (and fp32 ONNX): auto measures every backend that can run the settings and picks the fastest with parity. Causal LMs: torch (int8/int4 kernels) or llama.cpp (GGUF q8_0 / q4_0 / q4_k_m).")
    eval: str | None = setting(None, "Labelled eval file for accuracy and logits SQNR (columns as in the model's recipe.yaml); pipeline: data.eval.")
    max_eval_samples: int | None = setting(None, "Evaluate on N rows of --eval only.", ge=1)
    max_length: int | None = setting(None, "Tokens per eval/calibration/training example (None: the model's recipe.yaml, else 128).", ge=1)
    threads: int = setting(1, "Intra-op threads for every latency number (1 = the reference setting).", ge=1)
    batch_size: int = setting(1, "Batch size of the latency input.", ge=1)
    seq_len: int = setting(128, "Sequence length of the latency input.", ge=2)
    repeats: int = setting(30, "Interleaved timing rounds.", ge=1)
    min_sqnr_db: float | None = setting(None, f"Logits SQNR (dB) the result must reach, else exit 2 writing nothing; int8 picks among backends that reach it, and searches a mixed-precision ONNX candidate above what all-int8 reaches (None: {DEFAULT_MIN_SQNR_DB:g} for int8/fp32, no gate for int4/nf4/kmeans).", flag="--min-sqnr", metavar="DB")
    max_accuracy_drop: float | None = setting(None, f"Accuracy points (vs fp32 on --eval) the result may lose, else exit 2 writing nothing (None: {DEFAULT_MAX_ACCURACY_DROP:g} for int8/fp32, no gate for int4/nf4/kmeans); applies only with --eval.", ge=0, metavar="PT")
    max_perplexity_increase: float | None = setting(None, "Causal LMs: percent the perplexity on --eval may rise over fp32 (None: 5); the fastest decoder within it is written.", ge=0, metavar="PCT")
    new_tokens: int = setting(64, "Causal LMs: greedy tokens generated per speed run (bs 1, a --seq-len-token prompt).", ge=2)
    export_dequantized: bool = setting(False, "int4/nf4/kmeans: also write OUTPUT/dequantized/ (a plain float HF folder).")
    calib: str | None = setting(None, "int8: texts for the mixed-precision search (labels unused; None: --train, else --eval). Causal LMs, int4: chat/instruction JSONL or text for GPTQ and norm tuning (None: --train; neither: plain q4_0 rounding).")
    calib_samples: int = setting(256, "int8: calibration rows for the mixed-precision search; causal LMs: GPTQ calibration rows (and norm-tuning examples).", ge=1)
    norm_steps: int | None = setting(None, "Causal LMs, int4: steps tuning only the RMSNorm gains of the GPTQ Q4_0 candidate against the fp32 model (KD on the calibration answers; the 4-bit codes stay). None: 60 with calibration data.", ge=0)
    norm_lr: float = setting(1e-3, "Causal LMs: learning rate of the norm tuning.", gt=0)
    qat_steps: int = setting(0, "int4/nf4/kmeans: fake-quant recovery fine-tune steps on --train before quantizing (0: post-training only).", ge=0)
    train: str | None = setting(None, "Labelled training file for --qat-steps (and int8 calibration); pipeline: data.train.")
    qat_lr: float = setting(2e-5, "Learning rate of the recovery fine-tune.", gt=0)
    qat_batch_size: int = setting(16, "Batch size of the recovery fine-tune.", ge=1)

    def weight_config(self) -> Any:
        """The quantization config this scheme and these options stand for (None for fp32)."""
        return make_config(self.scheme, granularity=self.granularity, group_size=self.group_size, bits=self.bits,
                           symmetric=self.symmetric, include_embeddings=self.include_embeddings)

    def gates(self) -> dict[str, float | None]:
        """The parity gates this run applies (None: no such gate)."""
        default = self.scheme not in WEIGHT_ONLY
        sqnr = self.min_sqnr_db if self.min_sqnr_db is not None else (DEFAULT_MIN_SQNR_DB if default else None)
        drop = self.max_accuracy_drop if self.max_accuracy_drop is not None else (
            DEFAULT_MAX_ACCURACY_DROP if default else None)
        if self.eval is None:  # no labelled file: no accuracy to gate on (metrics.json says so)
            drop = None
        return {"min_sqnr_db": sqnr, "max_accuracy_drop": drop}

    def int8_backends(self) -> list[str]:
        """The int8 backends to build: those asked for that can run :meth:`weight_config` as given."""
        cfg = self.weight_config()
        wanted = list(BACKENDS) if self.backend == "auto" else [self.backend]
        return [b for b in wanted if int8_backend_gap(b, cfg) is None]

    def validate(self, *, check_model: bool = True, decoder: bool | None = None) -> None:
        """Check every setting, file and the model folder before any weight loads (errors name the flag).

        Args:
            check_model: Also require ``model``/``output`` and check the model folder (the
                pipeline validates its recipe before the previous stage's folder exists).
            decoder: Without ``check_model``: whether the model will be a causal LM (the
                pipeline knows its task); None: a classifier.
        """
        check_ranges(self, "--")
        if self.is_decoder() if check_model else decoder:
            if check_model:
                self._check_output()
            validate_decoder(self)
            for flag, path in (("--eval", self.eval), ("--train", self.train), ("--calib", self.calib)):
                check_file(flag, path)
            return
        if check_model:
            self._check_model_and_output()
        if self.backend == "llama.cpp" or self.max_perplexity_increase is not None or self.norm_steps is not None:
            flag = ("--backend llama.cpp" if self.backend == "llama.cpp" else "--max-perplexity-increase"
                    if self.max_perplexity_increase is not None else "--norm-steps")
            raise QuantizeError(f"{flag}: applies to causal LMs; {self.model} is a classifier")
        cfg = self.weight_config()
        self._check_combinations(cfg)
        for flag, path in (("--eval", self.eval), ("--train", self.train), ("--calib", self.calib)):
            check_file(flag, path)

    def _check_combinations(self, cfg: Any) -> None:
        s = self.scheme
        if s in WEIGHT_ONLY and self.backend != "auto":
            raise QuantizeError(f"--backend applies to int8 (and fp32 ONNX); {s} is a weight-only "
                                f"storage format decoded to float at load")
        if s == "fp32" and self.backend not in ("auto", "onnxruntime"):
            raise QuantizeError("--scheme fp32 only writes the fp32 ONNX folder: use --backend onnxruntime")
        if self.qat_steps and s not in WEIGHT_ONLY:
            raise QuantizeError(f"--qat-steps applies to int4, nf4 and kmeans, not {s}")
        if self.qat_steps and not self.train:
            raise QuantizeError("--qat-steps needs --train FILE (labelled data for the recovery fine-tune)")
        if self.export_dequantized and s not in WEIGHT_ONLY:
            raise QuantizeError(f"--export-dequantized applies to int4, nf4 and kmeans, not {s}")
        if self.calib is not None and s != "int8":
            raise QuantizeError(f"--calib feeds int8's mixed-precision search; it does not apply to {s}")
        if s == "int8" and not self.int8_backends():
            wanted = list(BACKENDS) if self.backend == "auto" else [self.backend]
            reasons = {b: int8_backend_gap(b, cfg) for b in wanted}
            gaps = (next(iter(reasons.values())) if len(set(reasons.values())) == 1
                    else "; ".join(f"{b}: {why}" for b, why in reasons.items()))
            raise QuantizeError(f"--scheme int8 {_describe(cfg)}: no int8 backend runs these settings ({gaps})")

    def calibration_file(self) -> str | None:
        """Causal LMs: the file GPTQ and norm tuning read (``--calib``, else ``--train``)."""
        return self.calib or self.train

    def is_decoder(self) -> bool:
        """Whether ``--model`` is a causal-LM folder (read from its config.json; no weights)."""
        return bool(self.model) and is_causal_lm_folder(self.model)

    def _check_model_and_output(self) -> None:
        if not self.model:
            raise QuantizeError("--model: is required (the classifier folder to quantize)")
        check_classifier_model(self.model, "quantize", allow_aliases=False)
        self._check_output()

    def _check_output(self) -> None:
        if not self.output:
            raise QuantizeError("--output: is required (the folder to write)")
        out, src = Path(self.output), Path(str(self.model))
        if out.exists() and not out.is_dir():
            raise QuantizeError(f"--output {out}: exists and is not a folder")
        if out.resolve() == src.resolve():
            raise QuantizeError("--output must differ from --model (the fp32 model is the reference)")
        check_output(out, overwrite=self.overwrite)


def candidate_names(scheme: str, backend: str, calibrated: bool = False) -> list[str]:
    """The candidates ``--scheme``/``--backend`` ask for (llama.cpp ones only when it is installed).

    With calibration data int4's Q4_0 is GPTQ-rounded (``llama.cpp-q4_0-gptq``: the same file format
    and kernel as plain rounding, less error), else rounded to nearest (``llama.cpp-q4_0``). Q4_1 is
    not a candidate: the packaged SmolLM2 is dequantized from Q4_1, so re-rounding a fine-tune of it
    to Q4_1 snaps it back to the base's grid and erases the tuning (docs/quantization.md).
    """
    q4_0 = "llama.cpp-q4_0-gptq" if calibrated else "llama.cpp-q4_0"
    names = {"int8": ["llama.cpp-q8_0", "torch-int8"], "int4": [q4_0, "llama.cpp-q4_k_m", "torch-int4"]}[scheme]
    if backend != "auto":
        names = [n for n in names if n.startswith(backend + "-")]
    if not llamacpp_available():
        names = [n for n in names if not n.startswith("llama.cpp")]
    return names


def validate_decoder(s: QuantizeSettings) -> None:
    """The rules for a causal-LM ``--model`` (checked before any weight loads)."""
    if s.scheme not in ("int8", "int4"):
        raise QuantizeError(f"--scheme {s.scheme}: a causal LM is quantized to int8 or int4 on a kernel that runs "
                            f"the codes (nf4 is the frozen base of --method qlora in slimtune finetune)")
    if s.backend not in ("auto", "torch", "llama.cpp"):
        raise QuantizeError(f"--backend {s.backend}: a causal LM runs on torch kernels or llama.cpp (auto: measure both)")
    given = [f for f, v in (("--granularity", s.granularity), ("--bits", s.bits), ("--symmetric", s.symmetric),
                            ("--export-dequantized", s.export_dequantized or None),
                            ("--qat-steps", s.qat_steps or None), ("--min-sqnr", s.min_sqnr_db),
                            ("--max-accuracy-drop", s.max_accuracy_drop)) if v is not None]
    if given:
        raise QuantizeError(f"{given[0]}: does not apply to a causal LM (its candidates have fixed layouts; the gate "
                            f"is --max-perplexity-increase)")
    if s.group_size is not None and s.group_size not in (32, 64, 128, 256):
        raise QuantizeError(f"--group-size {s.group_size}: torch's int4 kernel takes 32, 64, 128 or 256")
    if s.norm_steps and not (s.calib or s.train):
        raise QuantizeError("--norm-steps: needs --calib or --train (the answers the norms are tuned on)")
    if not candidate_names(s.scheme, s.backend):
        raise QuantizeError(f"--backend {s.backend}: llama-cpp-python is not installed (scripts/install.sh builds it)")


def _describe(cfg: Any) -> str:
    sym = "symmetric" if cfg.symmetric else "asymmetric"
    emb = "" if cfg.include_embeddings else ", float embeddings"
    return f"({cfg.granularity} scales, {sym}{emb})"


def make_config(scheme: str, *, granularity: str | None = None, group_size: int | None = None,
                bits: int | None = None, symmetric: bool | None = None,
                include_embeddings: bool = True) -> Any:
    """The config object for a scheme and CLI-style options, validated with clear errors.

    Returns:
        An ``Int8WeightConfig`` / ``Int4WeightConfig`` / ``NF4Config`` / ``KMeansConfig``, or
        None for ``fp32``.

    Raises:
        QuantizeError: an option that does not apply to the scheme, naming the flag.
    """
    if scheme not in SCHEMES:
        raise QuantizeError(f"--scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if group_size is not None and group_size < 2:
        raise QuantizeError(f"--group-size: must be >= 2, got {group_size}")
    kw: dict[str, Any] = {"include_embeddings": include_embeddings}
    if scheme in ("int8", "int4"):
        cls: type = Int8WeightConfig if scheme == "int8" else Int4WeightConfig
        kw.update(_affine_options(scheme, granularity, group_size, bits, symmetric))
    elif scheme == "nf4":
        cls = NF4Config
        kw.update(_nf4_options(granularity, group_size, bits, symmetric))
    elif scheme == "kmeans":
        cls = KMeansConfig
        kw.update(_kmeans_options(granularity, group_size, bits, symmetric))
    else:  # fp32
        given = [f for f, v in (("--granularity", granularity), ("--group-size", group_size), ("--bits", bits),
                                ("--symmetric/--asymmetric", symmetric)) if v is not None]
        if given or not include_embeddings:
            raise QuantizeError(f"{(given or ['--no-embeddings'])[0]} does not apply to --scheme fp32 (no quantization)")
        return None
    try:
        return cls(**kw)
    except ValueError as e:
        raise QuantizeError(f"--scheme {scheme}: {e}") from None


def _affine_options(scheme: str, granularity: str | None, group_size: int | None, bits: int | None,
                    symmetric: bool | None) -> dict[str, Any]:
    want = 8 if scheme == "int8" else 4
    if bits is not None and bits != want:
        raise QuantizeError(f"--bits {bits} contradicts --scheme {scheme} ({want} bits); --bits is for kmeans")
    kw: dict[str, Any] = {}
    if granularity is not None:
        kw["granularity"] = granularity
    if group_size is not None:
        if (granularity or ("channel" if scheme == "int8" else "group")) != "group":
            raise QuantizeError("--group-size needs --granularity group")
        kw["group_size"] = group_size
    if symmetric is not None:
        kw["symmetric"] = symmetric
    return kw


def _nf4_options(granularity: str | None, group_size: int | None, bits: int | None,
                 symmetric: bool | None) -> dict[str, Any]:
    if granularity not in (None, "group"):
        raise QuantizeError(f"nf4 is block-wise (use --group-size for the block size), not {granularity!r}")
    if bits not in (None, 4):
        raise QuantizeError(f"nf4 is a 4-bit code; --bits {bits} is not possible")
    if symmetric is not None:
        raise QuantizeError("--symmetric/--asymmetric do not apply to nf4")
    return {"block_size": group_size} if group_size is not None else {}


def _kmeans_options(granularity: str | None, group_size: int | None, bits: int | None,
                    symmetric: bool | None) -> dict[str, Any]:
    if granularity == "group" or group_size is not None:
        raise QuantizeError("kmeans codebooks are per tensor or per channel; --granularity group / --group-size do not apply")
    if symmetric is not None:
        raise QuantizeError("--symmetric/--asymmetric do not apply to kmeans")
    kw: dict[str, Any] = {}
    if bits is not None:
        kw["bits"] = bits
    if granularity is not None:
        kw["granularity"] = granularity
    return kw
