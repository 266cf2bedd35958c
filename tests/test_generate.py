"""Generation: greedy == transformers ``generate(do_sample=False)`` token for token (alone and in a
left-padded batch), sampling, stop strings, streaming, the ``generate`` command on merged and
base + adapter folders, and ``slimtune evaluate`` on chat data."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers_chat import make_tiny_chat_llama, polarity_rows, write_jsonl

from slimtune.cli.main import main
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.runtime.generate import (
    SamplingConfig,
    TextStream,
    generate_ids,
    generate_text,
    load_for_generation,
    prompt_ids,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and the machine is shared)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_llama(tmp_path_factory.mktemp("gen") / "llama", layers=2, hidden=64, init_std=0.2)


@pytest.fixture(scope="module")
def lm(model_dir: Path):  # noqa: ANN201
    return load_model(str(model_dir), "causal-lm").eval(), load_tokenizer(str(model_dir))


PROMPTS = ["good movie", "the plot is not bad , but boring", "love"]


def _hf_greedy(model, ids: torch.Tensor, mask: torch.Tensor | None, n: int, eos: int) -> list[list[int]]:  # noqa: ANN001
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                         pad_token_id=eos, eos_token_id=eos)
    rows = []
    for r in out[:, ids.shape[1]:].tolist():
        rows.append(r[: r.index(eos) + 1] if eos in r else r)
    return rows


def test_greedy_matches_transformers_generate(lm) -> None:  # noqa: ANN001
    model, tok = lm
    eos = tok.eos_token_id
    cfg = SamplingConfig(max_new_tokens=24)
    for p in PROMPTS:  # one prompt at a time, no padding
        ids = prompt_ids(tok, p)
        ref = _hf_greedy(model, torch.tensor([ids]), None, 24, eos)[0]
        assert generate_ids(model, tok, [ids], cfg)[0].token_ids == ref
    batch = [prompt_ids(tok, p) for p in PROMPTS]  # one left-padded batch
    L = max(map(len, batch))
    ids = torch.tensor([[eos] * (L - len(b)) + b for b in batch])
    mask = torch.tensor([[0] * (L - len(b)) + [1] * len(b) for b in batch])
    ref = _hf_greedy(model, ids, mask, 24, eos)
    got = generate_ids(model, tok, batch, cfg)
    assert [g.token_ids for g in got] == ref
    assert len({t for g in got for t in g.token_ids}) > 10  # a varied path, not one token repeated
    assert all(g.finish_reason == ("eos" if g.token_ids[-1] == eos else "length") for g in got)


def test_greedy_stops_at_eos_like_transformers(lm) -> None:  # noqa: ANN001
    model, tok = lm
    batch = [prompt_ids(tok, p) for p in PROMPTS]
    path = generate_ids(model, tok, batch[:1], SamplingConfig(max_new_tokens=24))[0].token_ids
    extra = path[5]  # make a token of the first path an EOS: rows now finish at different steps
    gen = model.generation_config
    old = gen.eos_token_id
    gen.eos_token_id = [tok.eos_token_id, extra]
    try:
        got = generate_ids(model, tok, batch, SamplingConfig(max_new_tokens=24))
        L = max(map(len, batch))
        ids = torch.tensor([[0] * (L - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (L - len(b)) + [1] * len(b) for b in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0)
    finally:
        gen.eos_token_id = old
    ref = []
    for r in out[:, L:].tolist():
        cut = next((i for i, t in enumerate(r) if t in (tok.eos_token_id, extra)), None)
        ref.append(r if cut is None else r[: cut + 1])
    assert [g.token_ids for g in got] == ref
    assert got[0].finish_reason == "eos" and len(got[0].token_ids) <= 6


def test_sampling_is_seeded_and_degenerates_to_greedy(lm) -> None:  # noqa: ANN001
    model, tok = lm
    ids = [prompt_ids(tok, "good movie")]
    greedy = generate_ids(model, tok, ids, SamplingConfig(max_new_tokens=12))[0].token_ids
    hot = SamplingConfig(max_new_tokens=12, temperature=1.5, seed=7)
    a = generate_ids(model, tok, ids, hot)[0].token_ids
    assert generate_ids(model, tok, ids, hot)[0].token_ids == a  # same seed, same tokens
    assert any(generate_ids(model, tok, ids, SamplingConfig(max_new_tokens=12, temperature=1.5, seed=s))[0].token_ids != a
               for s in range(8, 12))
    for narrow in (SamplingConfig(max_new_tokens=12, temperature=1.5, top_k=1, seed=3),
                   SamplingConfig(max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=3)):
        assert generate_ids(model, tok, ids, narrow)[0].token_ids == greedy
    with pytest.raises(ValueError, match="--top-p: must be in"):
        SamplingConfig(top_p=0).validate()


class _CharTok:
    """Decodes ids as characters (ids >= 1000 are the bytes of a two-byte character)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, i = "", 0
        while i < len(ids):
            if ids[i] >= 1000:
                out += "é" if i + 1 < len(ids) else "\ufffd"
                i += 2
            else:
                out += chr(ids[i])
                i += 1
        return out


def test_text_stream_holds_back_stop_prefixes_and_half_characters() -> None:
    s = TextStream(_CharTok(), stop=["END", "\n\n"])
    pieces = [s.push(ord(c)) for c in "ok E"]
    assert "".join(pieces) == "ok "  # "E" may start "END": held back
    assert s.push(ord("x")) == "Ex" and not s.stopped
    assert s.push(1000) == "" and s.push(1001) == "é"  # nothing until the character is whole
    assert [s.push(ord(c)) for c in "yEN"] == ["y", "", ""]
    assert s.push(ord("D")) == "" and s.stopped and s.text == "ok Exéy"
    t = TextStream(_CharTok(), stop=["END"])
    assert "".join(t.push(ord(c)) for c in "abE") + t.flush() == "abE"  # no stop: everything comes out


def test_stop_strings_and_streaming(lm) -> None:  # noqa: ANN001
    model, tok = lm
    full = generate_text(model, tok, ["good movie"], SamplingConfig(max_new_tokens=16))[0]
    words = full.text.split()
    assert len(words) >= 3, full
    stop = words[2]
    pieces: list[str] = []
    cut = generate_text(model, tok, ["good movie"], SamplingConfig(max_new_tokens=16, stop=[stop]),
                        on_text=lambda i, t: pieces.append(t))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert "".join(pieces) == cut.text  # the stream is exactly the answer


# --------------------------------------------------------------------------------------------
# Folders slimtune finetune writes; the commands
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from slimtune.config.recipe import resolve
    from slimtune.train.finetune import run_finetune

    root = tmp_path_factory.mktemp("tuned")
    train = write_jsonl(root / "train.jsonl", polarity_rows(64, seed=1))
    test = write_jsonl(root / "test.jsonl", polarity_rows(16, seed=2))
    out = root / "lora"
    run_finetune(resolve({"output": str(out), "model": {"name": str(model_dir), "task": "causal-lm"},
                          "data": {"train": str(train), "eval": str(test), "max_length": 32},
                          "train": {"max_steps": 24, "batch_size": 8, "lr": 5e-2, "warmup_ratio": 0.0,
                                    "tensorboard": False, "progress": False, "seed": 0},
                          "method": {"name": "lora", "r": 8}}))
    return {"out": out, "test": test}


def test_merged_and_adapter_folders_generate_the_same(tuned: dict[str, Path], model_dir: Path) -> None:
    cfg = SamplingConfig(max_new_tokens=8)
    merged, tok, _ = load_for_generation(tuned["out"])
    adapter, tok2, info = load_for_generation(tuned["out"] / "adapter")
    assert info["base"] == str(model_dir) and info["merged"]
    explicit, _, _ = load_for_generation(model_dir, tuned["out"] / "adapter")
    prompts = [r["input"] for r in polarity_rows(4, seed=5)]
    a = [g.token_ids for g in generate_text(merged, tok, prompts, cfg)]
    assert [g.token_ids for g in generate_text(adapter, tok2, prompts, cfg)] == a
    assert [g.token_ids for g in generate_text(explicit, tok2, prompts, cfg)] == a


def _cli(args: list[str], capsys: pytest.CaptureFixture[str], stdin: str | None = None,
         monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if stdin is not None and monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_command(tuned: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                          tmp_path: Path) -> None:
    out = tuned["out"]
    model, tok, _ = load_for_generation(out)
    cfg = SamplingConfig(max_new_tokens=4)
    want = [g.text for g in generate_text(model, tok, ["review ?\n\nfilm love", "review ?\n\nplot awful"], cfg)]
    rc, text, err = _cli(["--model", out, "--prompt", "review ?\n\nfilm love", "--max-new-tokens", 4], capsys)
    assert rc == 0 and text == want[0] + "\n", (text, err)
    chat = json.dumps([{"role": "user", "content": "review ?\n\nplot awful"}])
    rc, text, _ = _cli(["--model", out, "--max-new-tokens", 4], capsys, stdin=chat, monkeypatch=monkeypatch)
    assert rc == 0 and text == want[1] + "\n"
    rc, text2, _ = _cli(["--model", out / "adapter", "--max-new-tokens", 4, "--no-stream"], capsys,
                        stdin="review ?\n\nplot awful", monkeypatch=monkeypatch)
    assert text2 == text  # plain-text stdin == the same user message; adapter folder == merged
    rows = [{"instruction": "review ?", "input": "story great", "output": "fresh"},
            {"messages": [{"role": "user", "content": "review ?\n\nscene sad"}]},
            {"prompt": "review ?\n\nactor hate"}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    answers = tmp_path / "a.jsonl"
    rc, _, err = _cli(["--model", out, "--input", prompts, "--output", answers, "--max-new-tokens", 4,
                       "--batch-size", 2], capsys)
    assert rc == 0 and "3 answer(s)" in err
    got = [json.loads(x) for x in answers.read_text().splitlines()]
    lib = generate_text(model, tok, ["review ?\n\nstory great", "review ?\n\nscene sad", "review ?\n\nactor hate"], cfg)
    assert [r["generated"] for r in got] == [g.text for g in lib]  # batched (left-padded) == the library
    assert got[0]["reference"] == "fresh" and "reference" not in got[1] and [r["line"] for r in got] == [1, 2, 3]
    rc, _, err = _cli(["--model", out, "--prompt", "x", "--top-p", "0"], capsys)
    assert rc == 2 and "--top-p: must be in (0, 1]" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, "{oops"])
    rc, _, err = _cli(["--model", out, "--input", bad], capsys)
    assert rc == 2 and "bad.jsonl:2: invalid JSON" in err


def test_evaluate_command_on_chat_data(tuned: dict[str, Path], tmp_path: Path) -> None:
    from slimtune.evaluate.evaluator import format_report, run_evaluate

    trained = json.loads((tuned["out"] / "metrics.json").read_text())  # what finetune measured
    m = run_evaluate(str(tuned["out"]), str(tuned["test"]), output=str(tmp_path / "m.json"))
    for k in ("exact_match", "accuracy", "answer_tokens"):
        assert m[k] == trained[k], k
    assert m["answer_perplexity"] == pytest.approx(trained["answer_perplexity"], rel=1e-4)
    assert m["answer_perplexity"] == m["perplexity"] and len(m["samples"]) == 5 and m["generated"] == 16
    assert json.loads((tmp_path / "m.json").read_text())["exact_match"] == m["exact_match"]
    report = format_report(m)
    assert "exact match" in report and "perplexity (answer tokens)" in report and "fresh" in report
