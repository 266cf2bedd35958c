"""Chat/instruction SFT on a tiny in-process Llama: formats, templates, masking, multi-turn,
packing, truncation, bad rows, every method through ``run_finetune``, QLoRA's NF4 base, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_chat import CHATML, make_tiny_chat_llama, polarity_rows, review_rows, write_jsonl

from slimtune.config.recipe import resolve
from slimtune.data.chat import (
    FALLBACK_CHAT_TEMPLATE,
    ChatRenderer,
    data_format,
    is_chat_data,
    load_chat,
    tokenize_chat,
)
from slimtune.data.datasets import DataError, collate
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.train.finetune import run_finetune

CHAT = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "good movie"},
                     {"role": "assistant", "content": "fresh"}, {"role": "user", "content": "bad plot"},
                     {"role": "assistant", "content": "rotten ."}]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and the machine is shared)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_llama(tmp_path_factory.mktemp("chat") / "llama")


@pytest.fixture(scope="module")
def tok(model_dir: Path):  # noqa: ANN201
    return load_tokenizer(str(model_dir))


def _ids(tok, words: str) -> list[int]:  # noqa: ANN001
    return tok.convert_tokens_to_ids(words.split())


def _tokenize(tok, path: Path, max_length: int = 64, mode: str = "auto", packing: bool = False):  # noqa: ANN001, ANN202
    return tokenize_chat(load_chat(path), tok, max_length, renderer=ChatRenderer(tok, mode), packing=packing)


# --------------------------------------------------------------------------------------------
# Formats and templates
# --------------------------------------------------------------------------------------------


def test_formats_are_detected_and_read_to_the_same_messages(tmp_path: Path) -> None:
    want = [{"role": "user", "content": "good movie"}, {"role": "assistant", "content": "fresh"}]
    files = {
        "chat": {"messages": want},
        "alpaca": {"instruction": "good movie", "input": "", "output": "fresh"},
        "prompt-completion": {"prompt": "good movie", "completion": "fresh"},
    }
    for fmt, row in files.items():
        p = write_jsonl(tmp_path / f"{fmt}.jsonl", [row, row])
        assert data_format(p) == fmt and is_chat_data(p)
        assert [c.messages for c in load_chat(p).conversations] == [want, want]
    sharegpt = {"conversations": [{"from": "human", "value": "good movie"}, {"from": "gpt", "value": "fresh"}]}
    assert load_chat(write_jsonl(tmp_path / "sg.jsonl", [sharegpt])).conversations[0].messages == want
    arr = tmp_path / "alpaca.json"  # the original Alpaca file is one JSON array
    arr.write_text(json.dumps([files["alpaca"], {"instruction": "x", "input": "good", "output": "fresh"}], indent=1))
    convs = load_chat(arr).conversations
    assert convs[1].messages[0]["content"] == "x\n\ngood" and convs[1].line > convs[0].line > 1
    assert not is_chat_data(write_jsonl(tmp_path / "c.txt", ["just text"]))  # .txt: the raw-LM path
    with pytest.raises(DataError, match=r"t\.jsonl:1: rows with a 'text' key are raw text"):
        data_format(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]))


def test_template_rendering_matches_the_tokenizers_own(tok, tmp_path: Path) -> None:  # noqa: ANN001
    r = ChatRenderer(tok)
    assert r.source == "model"
    msgs = CHAT["messages"]
    assert r.render(msgs) == tok.apply_chat_template(msgs, tokenize=False)
    assert r.render(msgs[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    data = _tokenize(tok, write_jsonl(tmp_path / "c.jsonl", [CHAT]))
    # an example is its whole rendered text's tokenization (ids diffed at the piece boundaries)
    assert data.input_ids[0] == tok(r.render(msgs), add_special_tokens=False)["input_ids"]
    assert data.info["chat"]["piecewise_tokenized"] == 0


def test_fallback_and_plain_templates(model_dir: Path, tmp_path: Path) -> None:
    bare = make_tiny_chat_llama(tmp_path / "bare", template=None)
    tok = load_tokenizer(str(bare))
    r = ChatRenderer(tok)
    assert r.source == "fallback" and r.template == FALLBACK_CHAT_TEMPLATE
    text = r.render(CHAT["messages"][:3])
    assert text == "### System:\nbe nice\n\n### User:\ngood movie\n\n### Assistant:\nfresh</s>\n\n"
    assert r.render(CHAT["messages"][:2], add_generation_prompt=True).endswith("### User:\ngood movie\n\n### Assistant:\n")
    with pytest.raises(DataError, match="no chat template"):
        ChatRenderer(tok, "model")
    plain = ChatRenderer(tok, "none")
    assert plain.render(CHAT["messages"][1:3]) == "good moviefresh</s>"
    data = _tokenize(tok, write_jsonl(tmp_path / "c.jsonl", [{"prompt": "good movie", "completion": "fresh"}]), mode="none")
    # "good movie" + "fresh</s>" is "good moviefresh</s>": a word merges across the boundary, so
    # this example is tokenized piece by piece (the prompt exactly as generation tokenizes it)
    assert data.input_ids[0] == _ids(tok, "good movie fresh </s>")
    assert data.token_labels[0] == [-100, -100] + _ids(tok, "fresh </s>")
    assert data.info["chat"]["piecewise_tokenized"] == 1


# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------


def test_loss_only_on_answer_tokens_against_a_hand_built_mask(model_dir: Path, tok, tmp_path: Path) -> None:  # noqa: ANN001
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "good movie", "output": "fresh"}])
    data = _tokenize(tok, p)
    # <|im_start|> user good movie <|im_end|> <|im_start|> assistant | fresh <|im_end|>   (\n: no token)
    ids = _ids(tok, "<|im_start|> user good movie <|im_end|> <|im_start|> assistant fresh <|im_end|>")
    assert data.input_ids == [ids]
    assert data.token_labels == [[-100] * 7 + ids[7:]]
    model = load_model(str(model_dir), "causal-lm").eval()
    batch = collate(data, [0])
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(input_ids=batch["input_ids"]).logits[0]
    # position t predicts token t + 1: answer tokens 7, 8 are predicted at positions 6, 7
    manual = torch.nn.functional.cross_entropy(logits[[6, 7]], torch.tensor(ids[7:]))
    torch.testing.assert_close(loss, manual)


def test_multi_turn_trains_every_assistant_turn(tok, tmp_path: Path) -> None:  # noqa: ANN001
    data = _tokenize(tok, write_jsonl(tmp_path / "m.jsonl", [CHAT]))
    ids, labels = data.input_ids[0], data.token_labels[0]
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    assert trained == _ids(tok, "fresh <|im_end|> rotten . <|im_end|>")
    assert data.info["chat"]["assistant_turns"] == 2 and data.info["chat"]["split_conversations"] == 0


def test_template_that_rewrites_history_gives_one_example_per_turn(tok, tmp_path: Path) -> None:  # noqa: ANN001
    # Earlier answers are hidden once the conversation goes on (like templates that drop past
    # reasoning): not prefix-stable, so each assistant turn becomes its own example.
    tok2 = load_tokenizer(tok.name_or_path)
    tok2.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                          "{{ '<|im_start|>assistant\n...<|im_end|>\n' }}{% else %}"
                          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    data = _tokenize(tok2, write_jsonl(tmp_path / "m.jsonl", [CHAT]))
    assert len(data) == 2 and data.info["chat"]["split_conversations"] == 1
    answers = [[t for t, lab in zip(i, la, strict=True) if lab != -100] for i, la in zip(data.input_ids, data.token_labels, strict=True)]
    assert answers == [_ids(tok, "fresh <|im_end|>"), _ids(tok, "rotten . <|im_end|>")]


# --------------------------------------------------------------------------------------------
# Truncation and packing
# --------------------------------------------------------------------------------------------


def test_truncation_counts_and_never_keeps_an_example_without_answer(tok, tmp_path: Path) -> None:  # noqa: ANN001
    rows = [{"prompt": "good " * 20, "completion": "fresh"},  # prompt alone > 12 tokens: dropped
            {"prompt": "good", "completion": "bad " * 20},  # answer cut, kept
            {"prompt": "good", "completion": "fresh"}]
    data = _tokenize(tok, write_jsonl(tmp_path / "t.jsonl", rows), max_length=12)
    info = data.info["chat"]
    assert (info["truncated"], info["dropped"], info["examples"]) == (2, 1, 2)
    assert info["answer_tokens_cut"] > 0 and all(len(x) <= 12 for x in data.input_ids)
    assert all(any(lab != -100 for lab in la) for la in data.token_labels)
    with pytest.raises(DataError, match="every example lost its whole answer"):
        _tokenize(tok, write_jsonl(tmp_path / "d.jsonl", rows[:1]), max_length=12)


def test_packing_keeps_attention_inside_each_example(model_dir: Path, tok, tmp_path: Path) -> None:  # noqa: ANN001
    p = write_jsonl(tmp_path / "r.jsonl", review_rows(12, seed=3))
    plain = _tokenize(tok, p, max_length=40)
    packed = _tokenize(tok, p, max_length=40, packing=True)
    assert len(packed) < len(plain) and all(len(b) <= 40 for b in packed.input_ids)
    assert sum(map(len, plain.input_ids)) == sum(map(len, packed.input_ids))
    assert sum(lab != -100 for la in packed.token_labels for lab in la) == plain.info["chat"]["answer_tokens"]
    model = load_model(str(model_dir), "causal-lm").eval()
    model.config.use_cache = False  # what finetune sets for SFT: packed masks need no cache
    batch = collate(packed, [0, 1])
    assert "attention_mask" not in batch and batch["position_ids"][0, 0] == 0
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    starts = [i for i, v in enumerate(packed.position_ids[0]) if v == 0]
    assert len(starts) >= 2
    second = packed.input_ids[0][starts[1]:starts[2] if len(starts) > 2 else None]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second])).logits[0]
    torch.testing.assert_close(logits[starts[1]:starts[1] + len(second)], alone, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Bad rows
# --------------------------------------------------------------------------------------------

GOOD = {"chat": json.dumps({"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "fresh"}]}),
        "alpaca": json.dumps({"instruction": "good", "output": "fresh"}),
        "prompt-completion": json.dumps({"prompt": "good", "completion": "fresh"})}
BAD_ROWS = {
    "invalid JSON": ('{"messages": [', r"invalid JSON"),
    "not an object": ("[1, 2]", r"expected a JSON object"),
    "missing messages": ('{"msgs": []}', r"missing 'messages'"),
    "empty messages": ('{"messages": []}', r"non-empty list"),
    "missing role": ('{"messages": [{"content": "hi"}]}', r"message 1 has no 'role'"),
    "unknown role": ('{"messages": [{"role": "bot", "content": "hi"}]}', r"unknown role 'bot'"),
    "missing content": ('{"messages": [{"role": "user"}]}', r"message 1 \(user\) has no 'content'"),
    "non-string content": ('{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]}',
                           r"non-string content \(list\)"),
    "empty answer": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
                     r"message 2 \(answer\) is empty"),
    "ends on user": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}, '
                     '{"role": "user", "content": "and?"}]}', r"ends on a user turn"),
    "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', r"no assistant message"),
    "answer first": ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}, '
                     '{"role": "assistant", "content": "y"}]}', r"no user message before it"),
    "alpaca without output": ('{"instruction": "hi", "output": null}', r"'output' \(the answer\) has non-string"),
    "completion not a string": ('{"prompt": "hi", "completion": 3}', r"'completion' \(the answer\) has non-string"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_name_file_and_line_or_are_skipped(case: str, tmp_path: Path) -> None:
    row, msg = BAD_ROWS[case]
    fmt = "alpaca" if "alpaca" in case else "prompt-completion" if "completion" in case else "chat"
    p = tmp_path / "bad.jsonl"
    p.write_text(f"{GOOD[fmt]}\n\n{row}\n{GOOD[fmt]}\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{msg}"):
        load_chat(p, fmt)
    chat = load_chat(p, fmt, skip_bad_rows=True)
    assert (len(chat), chat.skipped, chat.rows) == (2, 1, 3)


# --------------------------------------------------------------------------------------------
# slimtune finetune on chat data: every method, QLoRA, resume
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft-data")
    return {"train": write_jsonl(root / "train.jsonl", review_rows(48, seed=1)),
            "eval": write_jsonl(root / "eval.jsonl", review_rows(12, seed=2))}


def _recipe(model_dir: Path, files: dict[str, Path], out: Path, method: str, steps: int = 4, **data: object):  # noqa: ANN202
    return resolve({"output": str(out), "model": {"name": str(model_dir), "task": "causal-lm"},
                    "data": {"train": str(files["train"]), "eval": str(files["eval"]), "max_length": 48, **data},
                    "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0,
                              "tensorboard": False, "progress": False, "seed": 0, "num_threads": 1},
                    "method": {"name": method}})


@pytest.mark.parametrize("method", ["full", "lora", "adalora", "ia3", "adapters", "qlora"])
def test_finetune_sft_every_method(method: str, model_dir: Path, files: dict[str, Path], tmp_path: Path) -> None:
    from slimtune.runtime.generate import SamplingConfig, generate_text, load_for_generation

    steps = 10 if method == "adalora" else 4  # AdaLoRA needs room for its budget schedule
    m = run_finetune(_recipe(model_dir, files, tmp_path / method, method, steps, packing=method == "lora"))
    assert m["sft"] and m["chat_template"] == "model" and m["train"]["steps"] == steps
    assert m["answer_perplexity"] == m["perplexity"] and m["answer_perplexity_before"] == m["perplexity_before"]
    assert (m["trainable_params"] == m["params"]) if method == "full" else (0 < m["trainable_params"] < m["params"])
    assert m["peak_rss_mb"] > 0 and "exact_match" in m and "accuracy" in m and len(m["samples"]) == 5
    assert m["data"]["train"]["examples"] == 48 and m["data"]["eval"]["examples"] == 12
    assert (m["data"]["train"]["packed_blocks"] or 0) > 0 if method == "lora" else m["data"]["train"]["packed_blocks"] is None
    model, tok, _ = load_for_generation(str(tmp_path / method))
    assert model.config.use_cache is True  # restored for generation
    out = generate_text(model, tok, ["good movie"], SamplingConfig(max_new_tokens=3))
    assert len(out) == 1 and out[0].finish_reason in ("eos", "length")


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_template_used_is_recorded_and_saved_with_the_model(mode: str, files: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from slimtune.data.chat import PLAIN_CHAT_TEMPLATE

    bare = make_tiny_chat_llama(tmp_path / "bare", template=None)  # a tokenizer without a chat template
    m = run_finetune(_recipe(bare, files, tmp_path / "out", "lora", chat_template=mode))
    want = {"auto": ("fallback", FALLBACK_CHAT_TEMPLATE), "none": ("none", PLAIN_CHAT_TEMPLATE)}[mode]
    assert m["chat_template"] == want[0] and m["data"]["train"]["chat_template"] == want[0]
    assert "it is saved as the model's chat template" in capsys.readouterr().err
    assert load_tokenizer(str(tmp_path / "out")).chat_template == want[1]  # generate prompts as trained


def test_sft_learns_the_label_task(model_dir: Path, tmp_path: Path) -> None:
    files = {"train": write_jsonl(tmp_path / "train.jsonl", polarity_rows(64, seed=1)),
             "eval": write_jsonl(tmp_path / "eval.jsonl", polarity_rows(16, seed=2))}
    m = run_finetune(_recipe(model_dir, files, tmp_path / "learn", "full", steps=60))
    assert m["answer_perplexity"] < 0.05 * m["answer_perplexity_before"], m
    assert m["exact_match"] >= 0.9 and m["accuracy"] >= 0.9 and m["no_label"] == 0, m
    assert {s["reference"] for s in m["samples"]} <= {"fresh", "rotten"}


def test_qlora_holds_the_base_in_nf4(model_dir: Path) -> None:
    from slimtune.compress.quant.codebook import decode_nf4, encode_nf4
    from slimtune.methods import MethodContext, get_method
    from slimtune.methods.qlora import NF4Linear, dequantize_lora_bases

    base = load_model(str(model_dir), "causal-lm")
    w = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    method = get_method("qlora")
    model = method.apply(base, method.config_cls(r=4), MethodContext("causal-lm", 4, str(model_dir)))
    nf4 = [mod for mod in model.modules() if isinstance(mod, NF4Linear)]
    assert len(nf4) == 2 * 7 and model._slimtune_qlora["nf4_bytes"] < model._slimtune_qlora["float_bytes"] / 6
    assert not any(isinstance(p, torch.nn.Parameter) and p.requires_grad and p.ndim == 2 and p.shape == w.shape
                   for p in model.parameters())
    layer = model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    assert isinstance(layer, NF4Linear)
    torch.testing.assert_close(layer.dequantized_weight(), decode_nf4(*encode_nf4(w, 64)))
    # backward re-decodes the weight: the input gradient equals a float linear's with the decoded weight
    x = torch.randn(3, 5, w.shape[1], requires_grad=True)
    (layer(x) ** 2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(x2, layer.dequantized_weight()) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert all(n.count("lora_") for n, p in model.named_parameters() if p.requires_grad)
    dequantize_lora_bases(model)
    assert not any(isinstance(mod, NF4Linear) for mod in model.modules())


def test_resumed_sft_run_matches_an_uninterrupted_one(model_dir: Path, files: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The run dies at batch 7 (after the step-4 checkpoint); the same recipe, re-run, resumes and
    ends bit-identical to an unbroken run (the kill -9 path itself: tests/test_train.py)."""
    from safetensors.torch import load_file

    import slimtune.train.loop as loop

    steps = 10
    ref = run_finetune(_resume_recipe(model_dir, files, tmp_path / "ref", steps))
    real, calls = loop.collate, {"n": 0}

    def dying(data, idx):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return real(data, idx)

    monkeypatch.setattr(loop, "collate", dying)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_finetune(_resume_recipe(model_dir, files, out, steps))
    assert (out / "checkpoints" / "step-0000004").is_dir() and not (out / "metrics.json").exists()
    monkeypatch.setattr(loop, "collate", real)
    res = run_finetune(_resume_recipe(model_dir, files, out, steps))
    assert res["train"]["resumed_from_step"] == 4
    assert res["loss"] == ref["loss"] and res["exact_match"] == ref["exact_match"]
    w_ref, w_res = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in w_ref:
        torch.testing.assert_close(w_res[k], w_ref[k], atol=0, rtol=0)


def _resume_recipe(model_dir: Path, files: dict[str, Path], out: Path, steps: int):  # noqa: ANN202
    r = _recipe(model_dir, files, out, "lora", steps, packing=True)
    r.train.save_every, r.train.eval_every = 4, 100
    return r


def test_chat_recipe_keys_are_validated(model_dir: Path, files: dict[str, Path], tmp_path: Path) -> None:
    from slimtune.config.recipe import RecipeError

    with pytest.raises(RecipeError, match="data.format"):
        _recipe(model_dir, files, tmp_path, "lora", format="sharegpt")
    with pytest.raises(RecipeError, match="data.chat_template"):
        _recipe(model_dir, files, tmp_path, "lora", chat_template="chatml")
    assert CHATML  # the helper's template is the tiny model's own


def test_finetune_command_on_chat_data(model_dir: Path, files: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from slimtune.cli.main import main

    out = tmp_path / "cli"
    args = ["finetune", "--model", str(model_dir), "--task", "causal-lm", "--train", str(files["train"]),
            "--output", str(out), "--max-steps", "2", "--batch-size", "8", "data.packing=true",
            "train.tensorboard=false", "train.progress=false"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())  # no --eval: 5% of the conversations held out
    assert m["sft"] and m["data"]["train"]["examples"] + m["data"]["eval"]["examples"] == 48
    assert "held-out" in m["eval_file"] and "answer_perplexity" in m
    bad = write_jsonl(tmp_path / "bad.jsonl", [review_rows(1)[0], {"instruction": "x"}])
    capsys.readouterr()
    swap = {str(files["train"]): str(bad), str(out): str(tmp_path / "cli-bad")}
    assert main([swap.get(a, a) for a in args]) == 2
    assert "bad.jsonl:2: missing 'output'" in capsys.readouterr().err
