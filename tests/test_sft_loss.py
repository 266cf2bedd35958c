"""The SFT loss (logits at answer positions only) equals the model's own loss, and so do its gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_chat import make_tiny_chat_llama, review_rows, write_jsonl

from slimtune.data.chat import ChatRenderer, load_chat, tokenize_chat
from slimtune.data.datasets import collate
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.train import sft_loss as S


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MULTI = [{"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "good movie"},
                      {"role": "assistant", "content": "fresh"}, {"role": "user", "content": "bad plot"},
                      {"role": "assistant", "content": "rotten ."}]},
         {"messages": [{"role": "user", "content": "sad"}, {"role": "assistant", "content": "rotten"}]}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_llama(tmp_path_factory.mktemp("sftloss") / "llama", init_std=0.2)


def _data(model_dir: Path, tmp_path: Path, packing: bool = False):  # noqa: ANN202
    tok = load_tokenizer(str(model_dir))
    chat = load_chat(write_jsonl(tmp_path / "d.jsonl", review_rows(10, seed=4)), "alpaca")  # varied lengths
    multi = load_chat(write_jsonl(tmp_path / "m.jsonl", MULTI), "chat")  # every assistant turn trains
    data = tokenize_chat(chat, tok, 64, renderer=ChatRenderer(tok, "auto"), packing=packing)
    extra = tokenize_chat(multi, tok, 64, renderer=ChatRenderer(tok, "auto"), packing=packing)
    data.input_ids += extra.input_ids
    data.token_labels += extra.token_labels
    if packing:
        data.position_ids += extra.position_ids
    return data


def _lora(model_dir: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(str(model_dir), "causal-lm")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in model.named_parameters():  # B != 0, so every LoRA weight gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _loss_and_grads(model: torch.nn.Module, batch: dict, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
    model.zero_grad(set_to_none=True)
    loss = fn(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["mask", "positions", "none"])
@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_equals_the_models_own_loss_and_gradients(mode: str, packing: bool, model_dir: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(model_dir, tmp_path, packing)
    model = _lora(model_dir)
    assert S.keep_mode(model) == "mask"  # transformers 5: Llama slices with slice_logits_to_keep
    monkeypatch.setitem(S._MODES, type(model.get_base_model()), mode)
    batch = collate(data, list(range(min(6, len(data)))))
    assert (batch["labels"] == -100).float().mean() > 0.3  # prompts and padding are masked: a real test
    ref_loss, ref_grads = _loss_and_grads(model, batch, lambda m, b: m(**b).loss)
    calls: list[dict] = []
    model.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw), with_kwargs=True)
    loss, grads = _loss_and_grads(model, batch, S.sft_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 12  # 2 layers x 3 modules x (A, B)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    keep = calls[0].get("logits_to_keep")
    if mode == "mask":  # exactly the positions that predict an answer token
        assert keep.dtype == torch.bool and int(keep.sum()) == int((batch["labels"][:, 1:] != -100).sum())
    elif mode == "positions":
        assert keep.dim() == 1 and keep.numel() < batch["input_ids"].shape[1]
    else:
        assert keep is None and "labels" in calls[0]


def test_a_batch_without_answer_tokens_gives_a_zero_loss(model_dir: Path, tmp_path: Path) -> None:
    data = _data(model_dir, tmp_path)
    model = _lora(model_dir)
    batch = collate(data, [0, 1])
    batch["labels"][:] = -100
    loss = S.sft_loss(model, batch)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(model(**{k: v for k, v in batch.items() if k != "labels"}).logits).all()


def test_finetune_trains_sft_with_the_answer_only_loss(model_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """run_finetune uses sft_loss for chat data and counts the tokens it trained on (one epoch: all of them)."""
    from slimtune.config.recipe import resolve
    from slimtune.train import finetune

    seen: list[str] = []
    real = S.sft_loss
    monkeypatch.setattr(finetune, "sft_loss", lambda m, b: seen.append("sft") or real(m, b))
    train = write_jsonl(tmp_path / "t.jsonl", review_rows(16, seed=1))
    ev = write_jsonl(tmp_path / "e.jsonl", review_rows(4, seed=2))
    recipe = resolve({"output": str(tmp_path / "run"), "model": {"name": str(model_dir), "task": "causal-lm"},
                      "data": {"train": str(train), "eval": str(ev), "max_length": 48},
                      "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "tensorboard": False, "progress": False},
                      "method": {"name": "lora", "r": 2}})
    out = finetune.run_finetune(recipe)
    assert seen and out["train"]["tokens"] == out["data"]["train"]["tokens"] > 16 * 5
    assert out["train"]["tokens_per_s"] > 0


@pytest.mark.parametrize("mode", ["mask", "positions"])
def test_sft_eval_loss_equals_evaluate_causal_lm(mode: str, model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from slimtune.evaluate.metrics import evaluate_causal_lm

    data = _data(model_dir, tmp_path)
    model = load_model(str(model_dir), "causal-lm")
    model.config.use_cache = False
    monkeypatch.setitem(S._MODES, type(model), mode)
    model.train()
    got = S.sft_eval_loss(model, data, batch_size=3)
    ref = evaluate_causal_lm(model, data, batch_size=3)  # full (B, T, vocab) logits
    assert got["tokens"] == ref["tokens"] == sum(x != -100 for la in data.token_labels for x in la[1:])
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5) and got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert model.training  # put back as it was
