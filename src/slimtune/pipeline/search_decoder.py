"""``slimtune compress`` for causal LMs: vocabulary x depth x weight quantization under a task constraint.

Given a tuned decoder (the *input*: reference and KD teacher), its chat/instruction training file
and a held-out chat file with short answers (``--eval``), the search builds candidates as a tree,
every step calling the stage modules, as the classifier search does
(:mod:`slimtune.pipeline.search`, whose bookkeeping, budget, Pareto front, choice and report it
reuses):

- ``input-int8`` / ``input-int4``: the input through ``slimtune quantize`` for a decoder
  (:func:`slimtune.compress.quant.decoder.run_decoder_quantize`: llama.cpp q8_0 / q4_0 / q4_k_m
  or torch int8 / int4 kernels, the fastest within the perplexity budget left);
- ``v``: the vocabulary pruned to the task text (train + eval; exact: the same tokens on it), no
  training (:func:`slimtune.compress.prune.recipe.run_prune`);
- ``v-d{K}``: vocabulary + depth: K decoder layers kept (lowest ShortGPT block influence dropped),
  then ``--recover-steps`` of KD from the input on the answer positions;
- ``...-int8`` / ``...-int4``: each of them quantized as above; int4's Q4_0 is GPTQ-rounded on
  ``GPTQ_ROWS`` rows of the training file and its RMSNorm gains tuned against the parent
  (``llama.cpp-q4_0-gptq``).

Depths run mild to aggressive; once one misses the constraint the deeper cuts are skipped (and
listed with the reason), as are steps that no longer fit ``--budget-minutes``. The constraint:
exact match on ``--eval`` at most ``--max-accuracy-drop`` points below the input's, answer
perplexity at most ``--max-perplexity-increase`` percent above it, and the optional size and
latency caps. In the shared machinery ``accuracy`` is the exact match and ``latency_ms_p50`` the
milliseconds per decoded token (greedy, bs 1, ``--threads``; 1000 / decode tokens/s), measured
for every candidate and the input in ONE interleaved run at the end
(:func:`slimtune.benchmark.decode.interleaved_speed`), each model tokenizing the same task prompt
with its own tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from slimtune.benchmark.decode import Runner, interleaved_speed, llamacpp_runner, torch_runner
from slimtune.benchmark.timing import hardware_fingerprint, set_threads
from slimtune.compress.prune.recipe import PruneSettings, run_prune
from slimtune.compress.quant.recipe import run_quantize
from slimtune.compress.quant.settings import QuantizeSettings
from slimtune.config.fields import RecipeError, save_settings
from slimtune.data.chat import is_chat_data, load_chat
from slimtune.evaluate.evaluator import run_evaluate
from slimtune.io import atomic_write_json, weights_size_mb
from slimtune.pipeline.search import CompressSettings, Search, finish_with
from slimtune.runtime.generate import load_for_generation, prompt_ids
from slimtune.runtime.gguf_folder import is_gguf_folder, open_gguf_folder

PROBE_TOKENS = 16  # greedy tokens of the quick speed probe that steers the search
MAX_KERNEL_TRIES = 3  # quantized children of one parent and scheme, each more accurate than the last
SPEED_TOKENS = 64  # greedy tokens per round of the final side-by-side bench
GPTQ_ROWS = 128  # int4 children: GPTQ calibration rows from --train (quantize's default is 256; 128 is ~3x quicker)


def check_decoder_settings(s: CompressSettings) -> int:
    """Decoder-only checks (before any weight loads); the input's layer count.

    Raises:
        RecipeError: naming the flag.
    """
    if not is_chat_data(s.eval):
        raise RecipeError(f"--eval {s.eval}: a decoder's constraint is exact match and answer perplexity on "
                          f"chat/instruction JSONL with short answers; raw text has neither (use slimtune prune and "
                          f"slimtune quantize --max-perplexity-increase for a raw-text LM)")
    if s.test is not None and not is_chat_data(s.test):
        raise RecipeError(f"--test {s.test}: chat/instruction JSONL expected for a decoder")
    n = int(json.loads((Path(s.model) / "config.json").read_text()).get("num_hidden_layers", 0))
    for k in s.keep_layers:
        kept = round(k * n) if k < 1 else int(k)
        if k >= 1 and k != int(k):
            raise RecipeError(f"--keep-layers: {k} is neither a whole count nor a fraction < 1")
        if not 1 <= kept < n:
            raise RecipeError(f"--keep-layers: {k} keeps {kept} of the model's {n} layers (1 to {n - 1} can be kept)")
    if "none" in (s.quant or []) and len(s.quant or []) == 1 and not s.keep_layers and not s.vocab:
        raise RecipeError("--quant none with no --keep-layers and --no-vocab: nothing to search")
    return n


def _kept(k: float, n: int) -> int:
    return round(k * n) if k < 1 else int(k)


class DecoderSearch(Search):
    """The classifier search's state, measuring decoders: exact match, answer perplexity, decode speed."""

    def __init__(self, s: CompressSettings, n_layers: int, log: Any = None):
        super().__init__(s, log)
        self.n_layers = n_layers
        self.max_perplexity: float | None = None
        self.eval_key = [s.eval, s.max_eval_samples, s.max_length, "decoder"]
        self._prompt = load_chat(s.eval, for_training=False).conversations[0].messages[:-1]  # the task prompt

    def feasible(self, c: dict[str, Any], use_final: bool = False) -> bool:
        """The classifier constraints (exact match as accuracy) and the perplexity budget."""
        if not super().feasible(c, use_final):
            return False
        ppl = c.get("answer_perplexity")
        return self.max_perplexity is None or ppl is None or ppl <= self.max_perplexity * (1 + 1e-9)

    def evaluate(self, d: str | Path, out_json: Path | None = None, eval_file: str | None = None) -> dict[str, Any]:
        """``slimtune evaluate`` of a folder on the chat file: exact match, answer perplexity, samples."""
        s = self.s
        return run_evaluate(str(d), eval_file or s.eval, output=str(out_json) if out_json else None,
                            max_length=s.max_length, max_eval_samples=s.max_eval_samples)

    def runner(self, d: str | Path, new_tokens: int) -> tuple[Runner, int, Any]:
        """(speed runner, prompt length, closer) of a folder: llama.cpp for GGUF folders, else torch."""
        if is_gguf_folder(d):
            lm, tok = open_gguf_folder(d, threads=self.s.threads, n_ctx=512 + new_tokens)
            ids = prompt_ids(tok, self._prompt)
            return llamacpp_runner(lm, ids), len(ids), lm.close
        model, tok, _ = load_for_generation(str(d))
        ids = prompt_ids(tok, self._prompt)
        return torch_runner(model.eval(), ids), len(ids), lambda: None

    def speed(self, folders: dict[str, str], new_tokens: int, repeats: int) -> dict[str, dict[str, Any]]:
        """Interleaved decode speed of several folders at ``--threads`` (all loaded at once)."""
        set_threads(self.s.threads)
        opened = {n: self.runner(d, new_tokens) for n, d in folders.items()}
        try:
            return interleaved_speed({n: r for n, (r, _, _) in opened.items()},
                                     {n: k for n, (_, k, _) in opened.items()}, new_tokens=new_tokens, repeats=repeats)
        finally:
            for _, _, close in opened.values():
                close()
            self._restore_threads()

    def measure(self, name: str, d: Path) -> dict[str, Any]:
        """Exact match and answer perplexity on --eval, size, and a quick decode-speed probe."""
        ev = self.evaluate(d)
        probe = self.speed({name: str(d)}, PROBE_TOKENS, 2)[name]
        q = json.loads((d / "metrics.json").read_text()) if (d / "quantize.yaml").is_file() else {}
        kernel = q.get("backend_candidate")
        return {"kind": "gguf" if is_gguf_folder(d) else "hf", "size_mb": weights_size_mb(d), "kernel": kernel,
                "kernel_increase_pct": (q.get("candidates", {}).get(kernel) or {}).get("perplexity_increase_pct"),
                "accuracy": ev.get("exact_match"), "answer_perplexity": ev.get("answer_perplexity"),
                "label_accuracy": ev.get("accuracy"), "params": ev.get("params"),
                "latency_ms_probe": 1000 / max(probe["decode_tokens_per_s"], 1e-9),
                "backend": "llama.cpp" if is_gguf_folder(d) else "torch"}

    # --- step makers -------------------------------------------------------------------------

    def quantized(self, parent: dict[str, Any], *_: Any) -> None:  # type: ignore[override]
        """``parent``'s int8 / int4 children (``slimtune quantize``'s decoder path): the fastest kernel within
        the perplexity budget the input's constraint leaves. When that kernel misses the exact-match
        constraint (and the parent meets it), the next is built with a perplexity gate just below the
        missed one's, so ``quantize`` picks a more accurate (slower) kernel: ``-r2``, ``-r3``."""
        for scheme in (q for q in self.s.quant or [] if q in ("int8", "int4")):
            ppl = parent.get("answer_perplexity")
            gate = (self.max_perplexity / ppl - 1) * 100 if ppl and self.max_perplexity else 1e9
            for attempt in range(1, MAX_KERNEL_TRIES + 1):
                name = f"{parent['name']}-{scheme}" + (f"-r{attempt}" if attempt > 1 else "")
                settings = {**parent["settings"], "quant": scheme, **({"max_perplexity_increase": gate} if attempt > 1
                                                                       else {})}
                if gate < 0:
                    self.record(name, parent=parent["name"], settings=settings, status="skipped",
                                reason=f"{parent['name']} already uses the whole perplexity budget")
                    break
                c = self.build(name, parent["name"], settings, f"quantize-{scheme}", self._quantize_step(
                    parent, scheme, gate))
                if c is None or self.feasible(c) or not self.feasible(parent) or c.get("kernel_increase_pct") is None:
                    break
                if c["kernel_increase_pct"] <= 0:  # quantize's gate cannot ask for less than fp32's perplexity
                    self.say(f"{name}: missed with {c['kernel']} at {c['kernel_increase_pct']:+.2f}% perplexity; no "
                             f"more accurate kernel to ask for")
                    break
                gate = c["kernel_increase_pct"] - 1e-6  # exclude the kernel that missed (and every less accurate one)

    def _quantize_step(self, parent: dict[str, Any], scheme: str, gate: float) -> Any:
        s = self.s

        def make(d: Path) -> None:
            run_quantize(QuantizeSettings(model=parent["path"], output=str(d), scheme=scheme, eval=s.eval,
                                          train=s.train if scheme == "int4" else None, calib_samples=GPTQ_ROWS,
                                          max_eval_samples=s.max_eval_samples, max_length=s.max_length,
                                          threads=s.threads, repeats=3, new_tokens=32, max_perplexity_increase=gate))

        return make

    def pruned(self, parent: str, name: str, settings: dict[str, Any], keep: int | None) -> dict[str, Any] | None:
        """A vocabulary (+ depth, KD-recovered) pruned child of the input."""
        s = self.s
        vocab_from = [f for f in (s.train, s.eval) if f] if s.vocab else []

        def make(d: Path) -> None:
            run_prune(PruneSettings(model=s.model, output=str(d), train=s.train, vocab_from=vocab_from,
                                    keep_layers=float(keep or 0), recover_steps=s.recover_steps if keep else 0,
                                    kd=bool(keep), lr=s.lr, batch_size=s.batch_size, max_length=s.max_length,
                                    max_train_samples=s.max_train_samples, seed=s.seed))

        return self.build(name, parent, settings, "depth" if keep else "vocab", make)


def _bench(S: Search) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Decode speed of every built candidate and the input in ONE interleaved run (+ ``--test`` scores)."""
    assert isinstance(S, DecoderSearch)
    s = S.s
    ok = [c for c in S.cands.values() if c.get("status") == "ok"]
    S.say(f"final side-by-side decode bench of {len(ok)} models (threads {s.threads}, bs 1, {SPEED_TOKENS} greedy "
          f"tokens, {s.bench_repeats} interleaved rounds)")
    speed = S.speed({c["name"]: c["path"] for c in ok}, SPEED_TOKENS, s.bench_repeats)
    for c in ok:
        m = speed[c["name"]]
        c.update(decode_tokens_per_s=m["decode_tokens_per_s"], prompt_tokens_per_s=m["prompt_tokens_per_s"],
                 latency_ms_p50=1000 / max(m["decode_tokens_per_s"], 1e-9), latency_ms_p95=None)
        if s.test:
            out = S.out / "test_metrics" / f"{c['name']}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            te = S.evaluate(c["path"], out, eval_file=s.test)
            c["test_accuracy"], c["test_answer_perplexity"] = te.get("exact_match"), te.get("answer_perplexity")
    return ok, {"hardware": hardware_fingerprint(), "speed": speed}


def run_decoder_compress(s: CompressSettings, log: Any = None) -> dict[str, Any]:
    """Run the decoder search; write ``best/``, ``candidates.json`` and the report; return a summary."""
    s.validate()
    if not s.decoder:
        raise RecipeError(f"--model {s.model}: not a causal LM (slimtune.pipeline.search.run_compress searches classifiers)")
    n_layers = check_decoder_settings(s)
    s = s.resolved()
    S = DecoderSearch(s, n_layers, log)
    atomic_write_json(S.out / "compress.json", dataclasses.asdict(s))
    save_settings(s, S.out / "compress.yaml")

    S.say(f"evaluating the input model on {s.eval}")
    ref = S.evaluate(s.model, S.out / "input_metrics.json")
    if ref.get("exact_match") is None:
        raise RecipeError(f"--eval {s.eval}: no exact match measured (the answers are not short labels or values)")
    S.min_accuracy = ref["exact_match"] - s.max_accuracy_drop / 100
    S.max_perplexity = ref["answer_perplexity"] * (1 + s.max_perplexity_increase / 100)
    S.record("input", parent=None, settings={"layers": n_layers, "vocab": "full", "quant": "none"}, status="ok",
             path=str(s.model), role="input", kind="hf", size_mb=weights_size_mb(s.model), params=ref.get("params"),
             accuracy=ref["exact_match"], answer_perplexity=ref["answer_perplexity"],
             label_accuracy=ref.get("accuracy"), backend="torch")
    S.say(f"input exact match {ref['exact_match']:.4f}, answer perplexity {ref['answer_perplexity']:.4f}; constraint: "
          f"exact match >= {S.min_accuracy:.4f}, answer perplexity <= {S.max_perplexity:.4f}")

    S.quantized(S.cands["input"])
    base = "input"
    if s.vocab:
        v = S.pruned("input", "v", {"layers": n_layers, "vocab": "task-text", "quant": "none"}, None)
        if v is not None:
            base = "v"
            S.quantized(v)
    missed: str | None = None
    for k in sorted({_kept(k, n_layers) for k in s.keep_layers}, reverse=True):  # mild -> aggressive
        name = f"{'v-' if s.vocab else ''}d{k}"
        settings = {"layers": k, "vocab": "task-text" if s.vocab else "full", "quant": "none",
                    "recover_steps": s.recover_steps}
        if missed is not None:
            S.record(name, parent=base, settings=settings, status="skipped",
                     reason=f"{missed} (fewer layers) already missed the constraint")
            continue
        c = S.pruned(base, name, settings, k)
        if c is None:
            continue
        if S.feasible(c):
            S.quantized(c)
        else:
            missed = name
    started = time.monotonic()
    summary = finish_with(S, {"accuracy": ref["exact_match"], **ref}, _bench, constraint=(
        f"exact match >= {S.min_accuracy:.4f} and answer perplexity <= {S.max_perplexity:.4f} on {s.eval} "
        f"(input {ref['exact_match']:.4f} - {s.max_accuracy_drop} pt; {ref['answer_perplexity']:.4f} "
        f"+ {s.max_perplexity_increase}%)"),
        latency=f"ms per decoded token: greedy, bs 1, threads {s.threads}, {SPEED_TOKENS} tokens after a task prompt, "
                f"best of {s.bench_repeats} interleaved rounds, one run")
    S.say(f"final bench and report in {time.monotonic() - started:.0f} s")
    return summary


__all__ = ["DecoderSearch", "check_decoder_settings", "run_decoder_compress"]
