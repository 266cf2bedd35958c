"""``slimtune compress`` on a causal LM: the decoder search (vocabulary x depth x quantization) on a tiny chat Llama.

A random 4-layer Llama with a byte-level BPE tokenizer and ChatML (``tests/helpers_bpe.py``)
and a tiny label task. Checked: every planned candidate is built (or skipped with its reason),
each is still a causal LM of the planned shape, every figure in ``candidates.json`` equals what
``slimtune evaluate`` gives for that folder on its own, the choice is the best feasible candidate
by the same score the classifier search uses, a miss stops the deeper cuts, and bad settings
exit 2 with one line naming the flag.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers_bpe import make_bpe_chat_llama
from helpers_chat import polarity_rows, write_jsonl
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.cli.main import main
from slimtune.evaluate.evaluator import run_evaluate
from slimtune.pipeline.search import CompressSettings, _score


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compress-decoder")
    return {"model": make_bpe_chat_llama(root / "llama"), "root": root,
            "train": write_jsonl(root / "train.jsonl", polarity_rows(40)),
            "eval": write_jsonl(root / "eval.jsonl", polarity_rows(10, seed=1))}


def compress(files: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["compress", "--model", str(files["model"]), "--train", str(files["train"]), "--eval",
                 str(files["eval"]), "--output", str(out), "--keep-layers", "3,2", "--quant", "int8",
                 "--recover-steps", "2", "--bench-repeats", "2", "--threads", "1", "--budget-minutes", "20", *extra])


@pytest.fixture(scope="module")
def searched(files: dict[str, Path]) -> Path:
    out = files["root"] / "out"
    assert compress(files, out, "--max-accuracy-drop", "100", "--max-perplexity-increase", "1000000") == 0
    return out


def test_every_candidate_is_built_and_still_a_causal_lm(searched: Path) -> None:
    cands = {c["name"]: c for c in json.loads((searched / "candidates.json").read_text())}
    assert set(cands) == {"input", "input-int8", "v", "v-int8", "v-d3", "v-d3-int8", "v-d2", "v-d2-int8"}
    assert all(c["status"] == "ok" for c in cands.values()), {n: c.get("reason") for n, c in cands.items()}
    for name, layers in (("v-d3", 3), ("v-d2", 2), ("v", 4)):
        d = Path(cands[name]["path"])
        assert AutoConfig.from_pretrained(d).num_hidden_layers == layers
        assert type(AutoModelForCausalLM.from_pretrained(d)).__name__ == "LlamaForCausalLM"
    v_vocab = AutoConfig.from_pretrained(cands["v"]["path"]).vocab_size
    assert v_vocab < AutoConfig.from_pretrained(cands["input"]["path"]).vocab_size
    for c in cands.values():
        assert 0 <= c["accuracy"] <= 1 and c["answer_perplexity"] > 1 and c["size_mb"] > 0, c["name"]
        assert c["latency_ms_p50"] == pytest.approx(1000 / c["decode_tokens_per_s"]), c["name"]
        assert c["meets_constraints"], c["name"]
    assert cands["v-d2"]["size_mb"] < cands["v-d3"]["size_mb"] < cands["v"]["size_mb"] < cands["input"]["size_mb"]
    saved = yaml.safe_load((searched / "compress.yaml").read_text())
    assert saved["quant"] == ["int8"] and saved["recover_steps"] == 2 and saved["batch_size"] == 8  # resolved


def test_figures_equal_slimtune_evaluate_of_each_folder(searched: Path, files: dict[str, Path], tmp_path: Path) -> None:
    cands = {c["name"]: c for c in json.loads((searched / "candidates.json").read_text())}
    for name in ("input", "v-d3", "v-d3-int8"):
        ref = run_evaluate(cands[name]["path"], str(files["eval"]), output=str(tmp_path / f"{name}.json"))
        assert cands[name]["accuracy"] == ref["exact_match"], name
        assert cands[name]["answer_perplexity"] == pytest.approx(ref["answer_perplexity"], rel=1e-6), name


def test_the_choice_is_the_best_feasible_by_the_shared_score(searched: Path) -> None:
    cands = json.loads((searched / "candidates.json").read_text())
    ref = next(c for c in cands if c["name"] == "input")
    ok = [c for c in cands if c["status"] == "ok" and c["meets_constraints"]]
    best = min(ok, key=lambda c: _score(c, ref, "balanced"))
    assert [c["name"] for c in cands if c["best"]] == [best["name"]]
    metrics = json.loads((searched / "best" / "metrics.json").read_text())
    assert metrics["candidate"] == best["name"] and metrics["meets_constraints"]
    again = run_evaluate(str(searched / "best"), str(Path(ref["path"]).parent / "eval.jsonl"),
                         output=str(searched / "best_eval.json"))
    assert again["exact_match"] == best["accuracy"]  # best/ is a working copy of the chosen folder
    summary = json.loads((searched / "summary.json").read_text())
    assert summary["best"] == best["name"] and summary["meets_constraints"]
    assert (searched / "report.html").is_file()


def test_a_miss_skips_the_deeper_cuts_and_exits_1(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tight"
    rc = compress(files, out, "--max-accuracy-drop", "100", "--max-size-mb", "0.001", "--quant", "none")
    assert rc == 1  # nothing fits 1 kB: the closest miss goes to best/, everything is kept
    cands = {c["name"]: c for c in json.loads((out / "candidates.json").read_text())}
    assert cands["v-d3"]["status"] == "ok" and not cands["v-d3"]["meets_constraints"]
    assert cands["v-d2"]["status"] == "skipped" and "v-d3 (fewer layers) already missed" in cands["v-d2"]["reason"]
    assert "input-int8" not in cands and (out / "best" / "metrics.json").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (["--keep-layers", "4"], "--keep-layers: 4.0 keeps 4 of the model's 4 layers"),
    (["--keep-layers", "2.5"], "--keep-layers: 2.5 is neither a whole count nor a fraction < 1"),
    (["--eval", "{text}"], "a decoder's constraint is exact match and answer perplexity"),
])
def test_bad_decoder_settings_exit_2_with_one_line(extra: list[str], message: str, files: dict[str, Path],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "lm.txt"
    text.write_text("plain text, no answers\n" * 20)
    args = [a.replace("{text}", str(text)) for a in extra]
    assert compress(files, tmp_path / "bad", "--max-accuracy-drop", "1", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "bad" / "candidates.json").exists()  # refused before any weight loads


def test_a_kernel_that_misses_the_task_constraint_is_retried_more_accurately() -> None:
    """The retry rule, with the build stubbed (which kernel wins a timed run is the machine's call, not the test's)."""
    from slimtune.pipeline.search_decoder import DecoderSearch

    S = DecoderSearch.__new__(DecoderSearch)  # only the state quantized() reads
    S.s = CompressSettings(model="m", train="t", eval="e", output="o", max_accuracy_drop=1, quant=["int4"])
    S.max_perplexity, S.min_accuracy = 2.2, 0.5
    built: list[tuple[str, dict]] = []
    outcomes = iter([("llama.cpp-q4_0-gptq", 8.0, 0.4), ("llama.cpp-q4_k_m", 3.0, 0.45), ("llama.cpp-q8_0", 1.0, 0.6)])

    def build(name: str, parent: str, settings: dict, kind: str, make: object) -> dict:
        kernel, inc, acc = next(outcomes)
        built.append((name, settings))
        return {"name": name, "status": "ok", "kernel": kernel, "kernel_increase_pct": inc, "accuracy": acc,
                "size_mb": 1.0, "answer_perplexity": 2.0}

    S.build, S.record, S.say = build, lambda *a, **k: None, lambda m: None
    parent = {"name": "v", "settings": {"vocab": "task-text"}, "answer_perplexity": 2.0, "status": "ok",
              "accuracy": 0.6, "size_mb": 2.0}
    S.quantized(parent)
    assert [n for n, _ in built] == ["v-int4", "v-int4-r2", "v-int4-r3"]  # two misses, then a hit: no fourth
    gates = [st.get("max_perplexity_increase") for _, st in built]
    assert gates[0] is None and gates[1] == pytest.approx(8.0) and gates[2] == pytest.approx(3.0)  # below each miss
    assert all(st["quant"] == "int4" and st["vocab"] == "task-text" for _, st in built)


def test_int4_children_are_gptq_calibrated_on_the_training_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """compress hands --train to quantize for int4 (GPTQ Q4_0 + norm tuning), not for int8 (q8_0 needs none)."""
    from slimtune.pipeline import search_decoder
    from slimtune.pipeline.search_decoder import GPTQ_ROWS, DecoderSearch

    seen: dict[str, object] = {}
    monkeypatch.setattr(search_decoder, "run_quantize", lambda q: seen.setdefault(q.scheme, q))
    S = DecoderSearch.__new__(DecoderSearch)
    S.s = CompressSettings(model="m", train="train.jsonl", eval="e", output="o", max_accuracy_drop=1)
    for scheme in ("int4", "int8"):
        S._quantize_step({"path": "parent"}, scheme, 5.0)(tmp_path / scheme)
    q4, q8 = seen["int4"], seen["int8"]
    assert q4.calibration_file() == "train.jsonl" and q4.calib_samples == GPTQ_ROWS  # type: ignore[attr-defined]
    assert q8.calibration_file() is None  # type: ignore[attr-defined]
