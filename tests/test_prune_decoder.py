"""Decoder pruning: depth (block influence), width (FFN neurons, whole KV groups), byte-level BPE
vocabulary pruning, causal KD recovery, and the ``slimtune prune`` command on causal LMs.

Every check compares against an independent reference: block influence against
``output_hidden_states``; dropped layers and removed units against the original model with those
parts made inert (zero output weights), whose logits must not change; the pruned tokenizer
against the original tokenizer on the task text; the KD loss against a hand-written KL.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from helpers_bpe import bpe_tokenizer, corpus, make_bpe_chat_llama
from helpers_chat import CHATML, polarity_rows, write_jsonl
from tiny import WORDS, llama_lm

from slimtune.cli.main import main
from slimtune.compress.prune.decoder_arch import decoder_layers, head_layout
from slimtune.compress.prune.decoder_calib import calibration_batches
from slimtune.compress.prune.decoder_depth import (
    block_influence,
    drop_layers,
    layers_to_drop,
    prune_depth,
)
from slimtune.compress.prune.decoder_kd import decoder_kd_loss_fn
from slimtune.compress.prune.decoder_vocab import (
    bpe_spec,
    kept_ids,
    prune_decoder_vocab,
    pruned_bpe_json,
)
from slimtune.compress.prune.decoder_width import prune_width
from slimtune.data.datasets import TokenizedData, collate


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prune-decoder")
    rng = random.Random(3)
    rows = [{"instruction": "Is this review fresh or rotten?", "input": " ".join(rng.choice(WORDS) for _ in range(5)),
             "output": "fresh"} for _ in range(4)]
    return {"model": make_bpe_chat_llama(root / "bpe-llama"), "root": root,
            "train": write_jsonl(root / "train.jsonl", polarity_rows(40) + rows),
            "eval": write_jsonl(root / "eval.jsonl", polarity_rows(12, seed=1))}


def _batch(vocab: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows, the second padded: (2, 12) ids and mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------


def test_block_influence_matches_hidden_states_reference() -> None:
    model = llama_lm(layers=4, pad_token_id=0).eval()
    batch = _batch()
    scores, tokens = block_influence(model, [batch])
    assert tokens == 20
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states  # embeddings, layer outputs (last normed)
    m = batch["attention_mask"].bool()
    for i in range(3):  # the last entry of hidden_states is after the final norm: not layer 3's raw output
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)[m]
        assert scores[i] == pytest.approx(1 - cos.mean().item(), abs=1e-5)
    assert len(scores) == 4 and all(0 <= s <= 2 for s in scores)


def test_an_inert_layer_has_zero_influence_and_is_the_one_dropped() -> None:
    model = llama_lm(layers=4, pad_token_id=0, initializer_range=0.2).eval()
    inert = decoder_layers(model)[2]
    with torch.no_grad():  # the block adds nothing to the residual stream: output == input
        inert.self_attn.o_proj.weight.zero_()
        inert.mlp.down_proj.weight.zero_()
    batch = _batch()
    new, record = prune_depth(model, [batch], 1)
    assert record["block_influence"][2] == pytest.approx(0.0, abs=1e-6)
    assert record["dropped_layers"] == [2] and record["kept_layers"] == [0, 1, 3]
    assert new.config.num_hidden_layers == 3 and len(decoder_layers(new)) == 3
    torch.testing.assert_close(_logits(new, batch), _logits(model, batch), rtol=0, atol=1e-5)


def test_dropped_layers_equal_the_model_without_them(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = llama_lm(layers=5, pad_token_id=0, initializer_range=0.2).eval()
    batch = _batch()
    new = drop_layers(model, [1, 3])
    ref = copy.deepcopy(model)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in (0, 2, 4)])
    torch.testing.assert_close(_logits(new, batch), _logits(ref, batch), rtol=0, atol=1e-6)
    new.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back).__name__ == "LlamaForCausalLM" and back.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(back, batch), _logits(new, batch), rtol=0, atol=0)
    assert layers_to_drop([0.3, 0.1, 0.5, 0.1], 2) == [1, 3]


# --------------------------------------------------------------------------------------------
# Width
# --------------------------------------------------------------------------------------------


def _decoder(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=3, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0)
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    bias = arch == "llama-bias"
    return LlamaForCausalLM(LlamaConfig(**common, attention_bias=bias, mlp_bias=bias)).eval()


@pytest.mark.parametrize("importance", ["activation", "magnitude", "taylor"])
@pytest.mark.parametrize("arch", ["llama", "llama-bias", "qwen2", "mistral"])
def test_width_removes_inert_units_without_changing_the_logits(arch: str, importance: str, tmp_path: Path) -> None:
    """Units whose output weights are zero contribute nothing: they score 0 and removing them is exact."""
    from transformers import AutoModelForCausalLM

    model = _decoder(arch)
    heads, kv, d = head_layout(model.config)
    rep = heads // kv
    dead_groups = [1, 0, 2]  # one KV group of 2 query heads per layer, a different one in each
    dead_neurons = []
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            g = dead_groups[i]
            layer.self_attn.o_proj.weight[:, g * rep * d:(g + 1) * rep * d] = 0
            neurons = torch.randperm(64, generator=torch.Generator().manual_seed(i))[:32]
            layer.mlp.down_proj.weight[:, neurons] = 0
            dead_neurons.append(set(neurons.tolist()))
    data = TokenizedData([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]], None, None, 0, causal=True)
    batches = [collate(data, [0, 1])]
    new, record = prune_width(model, batches, ffn=0.5, heads=0.34, importance=importance)
    assert record["kv_heads_after"] == 2 and record["heads_after"] == 4 and record["intermediate_after"] == 32
    for i, kept in enumerate(record["kept_kv_groups"]):
        assert dead_groups[i] not in kept, (i, kept)
    cfg = new.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, d, 32)
    batch = collate(data, [0, 1])
    batch.pop("labels")
    torch.testing.assert_close(_logits(new, batch), _logits(model, batch), rtol=0, atol=1e-5)
    new.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is type(model)
    torch.testing.assert_close(_logits(back, batch), _logits(new, batch), rtol=0, atol=0)


def test_activation_scores_match_a_hand_computation() -> None:
    """FFN: mean |silu(gate x) * up x| x ||down column||; KV group: mean ||o_proj(x with the other groups zeroed)||,
    over real tokens only (the padded row's tail must not count)."""
    from slimtune.compress.prune.decoder_width import width_importance

    model = _decoder("llama-bias")
    heads, kv, d = head_layout(model.config)
    rep = heads // kv
    data = TokenizedData([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], None, None, 0, causal=True)
    batch = collate(data, [0, 1])
    mask = batch["attention_mask"].bool()
    seen: dict[str, list[torch.Tensor]] = {"mlp": [], "o": []}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: seen["mlp"].append(a[0].detach()))
             for layer in decoder_layers(model)]
    hooks += [layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: seen["o"].append(a[0].detach()))
              for layer in decoder_layers(model)]
    _logits(model, {k: v for k, v in batch.items() if k != "labels"})
    for h in hooks:
        h.remove()
    ffn, groups = width_importance(model, [batch], "activation")
    for i, layer in enumerate(decoder_layers(model)):
        mlp, o = layer.mlp, layer.self_attn.o_proj
        x = seen["mlp"][i][mask]
        act = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        want = act.abs().mean(0) * mlp.down_proj.weight.norm(dim=0)
        torch.testing.assert_close(ffn[i], want.detach(), rtol=1e-4, atol=1e-6)
        z = seen["o"][i][mask]
        for g in range(kv):
            keep = torch.zeros(heads * d)
            keep[g * rep * d:(g + 1) * rep * d] = 1
            contrib = (o(z * keep) - o.bias).norm(dim=-1).mean()
            assert groups[i, g].item() == pytest.approx(contrib.item(), rel=1e-4)


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def test_bpe_vocabulary_pruning_is_exact_on_the_task_text(tmp_path: Path) -> None:
    tok = bpe_tokenizer(corpus())
    model = llama_lm(vocab_size=len(tok), hidden=32, layers=2, tie_word_embeddings=True, initializer_range=0.2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).eval()
    task = corpus(40, seed=5) + ["Is this review fresh ?\n\n<|im_start|>assistant\nrotten<|im_end|>"]
    old_ids = tok(task, add_special_tokens=False)["input_ids"]
    used = {i for ids in old_ids for i in ids}
    ref = copy.deepcopy(model)
    new_tok, new_to_old, info = prune_decoder_vocab(model, tok, used, tmp_path / "tok")
    assert info["vocab_size_after"] < info["vocab_size_before"] == len(tok)
    keep = new_to_old.tolist()
    for text, ids in zip(task, old_ids, strict=True):
        new_ids = new_tok(text, add_special_tokens=False)["input_ids"]
        assert new_tok.convert_ids_to_tokens(new_ids) == tok.convert_ids_to_tokens(ids), text
        assert [keep[i] for i in new_ids] == ids
        assert new_tok.decode(new_ids) == tok.decode(ids) == text
    # merges: exactly those whose two parts and result are kept
    spec, new_spec = bpe_spec(tok), bpe_spec(new_tok)
    kept_tokens = set(new_spec["model"]["vocab"])
    want = [m for m in spec["model"]["merges"] if m[0] in kept_tokens and m[1] in kept_tokens and m[0] + m[1] in kept_tokens]
    assert new_spec["model"]["merges"] == want
    # any text still encodes (bytes are kept) and decodes back
    for text in ("Ünïcödé ✓ 日本語 🤖 unseen wordz\t\t  x", "<|im_start|>user\nzzz<|im_end|>"):
        assert new_tok.decode(new_tok(text, add_special_tokens=False)["input_ids"]) == text
    # logits on kept tokens are the original's, sliced
    ids = torch.tensor([new_tok(task[0], add_special_tokens=False)["input_ids"]])
    lp = _logits(model, {"input_ids": ids})
    lo = _logits(ref, {"input_ids": new_to_old[ids]})[..., new_to_old]
    torch.testing.assert_close(lp, lo, rtol=0, atol=1e-6)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert (model.config.eos_token_id, model.config.pad_token_id) == (new_tok.eos_token_id, new_tok.pad_token_id)


def test_without_the_merge_closure_tokenization_would_change() -> None:
    """The ancestor closure is what makes pruning exact: dropping it changes some task token (the test can fail)."""
    from tokenizers import Tokenizer

    tok = bpe_tokenizer(corpus())
    task = corpus(40, seed=5)
    used = {i for ids in tok(task, add_special_tokens=False)["input_ids"] for i in ids}
    spec = bpe_spec(tok)
    vocab = spec["model"]["vocab"]
    from tokenizers import pre_tokenizers

    base = {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet()} | {t["id"] for t in spec["added_tokens"]}
    closed = kept_ids(spec, used)
    assert set(closed) > used | base  # intermediate tokens were added
    bare = Tokenizer.from_str(json.dumps(pruned_bpe_json(spec, sorted(used | base))))
    full = Tokenizer.from_str(json.dumps(pruned_bpe_json(spec, closed)))
    by_id = {i: t for t, i in vocab.items()}
    orig = [[by_id[i] for i in ids] for ids in tok(task, add_special_tokens=False)["input_ids"]]
    assert [full.encode(t).tokens for t in task] == orig
    assert [bare.encode(t).tokens for t in task] != orig


@pytest.mark.needs_assets("smollm2")
def test_smollm2_tokenizer_pruned_to_reviews_is_exact(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from slimtune.compress.prune.decoder_vocab import save_pruned_tokenizer
    from slimtune.models.loading import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2"))
    convs = [[{"role": "user", "content": f"Is this movie review fresh or rotten?\n\nReview: {t}"},
              {"role": "assistant", "content": "fresh" if i % 2 else "rotten"}] for i, t in enumerate(corpus(60, seed=9))]
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    old = tok(texts, add_special_tokens=False)["input_ids"]
    spec = bpe_spec(tok)
    keep = kept_ids(spec, {i for ids in old for i in ids})
    new = save_pruned_tokenizer(tok, pruned_bpe_json(spec, keep), tmp_path)
    assert 256 + 17 < len(new) < 5000
    for text, ids in zip(texts, old, strict=True):
        assert [keep[i] for i in new(text, add_special_tokens=False)["input_ids"]] == ids
    text = "Schrödinger's 🐈 wasn't in «Dune» (2021)… 東京"
    assert new.decode(new(text, add_special_tokens=False)["input_ids"]) == text
    assert (new.eos_token, new.eos_token_id, new.bos_token_id) == (tok.eos_token, tok.eos_token_id, tok.bos_token_id)


# --------------------------------------------------------------------------------------------
# Recovery loss
# --------------------------------------------------------------------------------------------


def test_causal_kd_loss_matches_a_hand_written_kl() -> None:
    teacher = llama_lm(vocab_size=50, layers=2, seed=1, pad_token_id=0).eval()
    student = llama_lm(vocab_size=20, layers=1, seed=2, pad_token_id=0).eval()
    new_to_old = torch.tensor(sorted(random.Random(0).sample(range(50), 20)))
    ids = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # "prompt"
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    T, alpha = 2.0, 0.7
    for positions, keep in (("all", mask[:, 1:].bool()), ("answer", labels[:, 1:] != -100)):
        loss = decoder_kd_loss_fn(teacher, new_to_old, temperature=T, alpha=alpha, positions=positions)(student, batch)
        with torch.no_grad():
            out = student(**batch)
            s = out.logits[:, :-1] / T
            t = teacher(input_ids=new_to_old[ids], attention_mask=mask).logits[..., new_to_old][:, :-1] / T
            kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)  # (B, T-1)
            want = alpha * T * T * kl[keep].mean() + (1 - alpha) * out.loss
        assert loss.item() == pytest.approx(want.item(), rel=1e-5), positions


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(["prune", *argv])
    return rc, capsys.readouterr().err


def test_prune_command_keeps_a_smaller_causal_lm(files: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "out"
    rc, err = _run(capsys, "--model", str(files["model"]), "--train", str(files["train"]), "--eval", str(files["eval"]),
                   "--keep-layers", "3", "--ffn", "0.5", "--heads", "0.5", "--vocab", "--recover-steps", "2", "--kd",
                   "--output", str(out))
    assert rc == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and c.architectures == ["LlamaForCausalLM"]
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (3, 3, 1, 8, 32)
    assert c.vocab_size == len(tok) < 420 and model.lm_head.weight is model.model.embed_tokens.weight
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == c.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template == CHATML
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "causal-lm" and m["params"] < m["params_before"]
    assert {"perplexity", "answer_perplexity", "exact_match", "accuracy"} <= set(m)
    assert len(m["depth"]["block_influence"]) == 4 and len(m["depth"]["dropped_layers"]) == 1
    assert m["vocab"]["identical_examples"] == m["vocab"]["checked_examples"] > 0
    assert m["train"]["steps"] == 2 and (out / "recipe.yaml").is_file()
    assert not list(out.glob(".tokenizer-tmp")) and not (out / "checkpoints").exists()
    # the saved settings repeat the run
    capsys.readouterr()
    assert main(["prune", "--config", str(out / "prune.yaml"), "--print-config"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert (tree["keep_layers"], tree["heads"], tree["vocab"], tree["kd"]) == (3, 0.5, True, True)


def test_recovery_lowers_the_answer_perplexity(files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    ppl = {}
    for steps in (0, 30):
        out = tmp_path / f"r{steps}"
        rc, err = _run(capsys, "--model", str(files["model"]), "--train", str(files["train"]), "--eval",
                       str(files["train"]), "--keep-layers", "2", "--recover-steps", str(steps), "--lr", "3e-3",
                       "--output", str(out))
        assert rc == 0, err
        ppl[steps] = json.loads((out / "metrics.json").read_text())["answer_perplexity"]
    assert ppl[30] < 0.7 * ppl[0], ppl


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "0.5"], "--sparsity/--pattern prune sequence classifiers only"),
    (["--keep-layers", "5", "--train", "{train}"], "--keep-layers 5: the model has only 4 layers"),
    (["--layers", "4", "--train", "{train}"], "--layers: can remove 0..3 of 4 layers"),
    (["--keep-layers", "2.5", "--train", "{train}"], "whole number"),
    (["--heads", "0.1", "--train", "{train}"], "removes no KV group (2 groups of 3 query heads"),
    (["--layers", "1", "--keep-layers", "2", "--train", "{train}"], "give one"),
    (["--ffn", "0.5"], "--train is required"),
    (["--vocab-min-count", "2", "--vocab", "--train", "{train}"], "keep every task token"),
    (["--kd"], "nothing to prune"),
    (["--vocab-top", "100"], "also give --vocab"),
])
def test_decoder_refusals_are_one_line_and_write_nothing(files: dict[str, Path], tmp_path: Path, args: list[str],
                                                         message: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    argv = [a.format(train=files["train"]) for a in args]
    rc, err = _run(capsys, "--model", str(files["model"]), "--output", str(out), *argv)
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_unsupported_decoders_and_tokenizers_are_refused(tmp_path: Path, files: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from tiny import make_tiny_llama
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(gpt2)
    rc, err = _run(capsys, "--model", str(gpt2), "--output", str(tmp_path / "o"), "--layers", "1",
                   "--train", str(files["train"]))
    assert rc == 2 and "supports the Llama layout" in err and "'gpt2'" in err, err
    word = make_tiny_llama(tmp_path / "word-llama")  # word-level tokenizer: no BPE merges to keep exact
    rc, err = _run(capsys, "--model", str(word), "--output", str(tmp_path / "o"), "--vocab-from", str(files["train"]))
    assert rc == 2 and "byte-level BPE" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_calibration_batches_are_seeded(files: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from slimtune.compress.prune.decoder_data import read_examples

    tok = AutoTokenizer.from_pretrained(files["model"])
    data = read_examples(str(files["train"]), tok, 64)
    a, b = (calibration_batches(data, 2, 4, seed=1) for _ in range(2))
    assert len(a) == 2 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    c = calibration_batches(data, 2, 4, seed=2)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))
    assert all(set(x) == {"input_ids", "attention_mask", "labels"} for x in a)


def test_vocab_top_keeps_the_first_tokens_too(files: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoTokenizer

    sizes = {}
    for top in (0, 380):
        out = tmp_path / f"top{top}"
        rc, err = _run(capsys, "--model", str(files["model"]), "--train", str(files["train"]), "--vocab",
                       "--vocab-top", str(top), "--output", str(out))
        assert rc == 0, err
        sizes[top] = json.loads((out / "metrics.json").read_text())["vocab"]["vocab_size_after"]
        tok, orig = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(files["model"])
        if top:
            first = orig.convert_ids_to_tokens(list(range(top)))
            assert tok.convert_ids_to_tokens(list(range(top))) == first  # ids 0..top-1 kept, in order
    assert 380 <= sizes[380] and sizes[0] < sizes[380] < 420, sizes
