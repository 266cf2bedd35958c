"""A tiny chat Llama (ChatML template, word-level tokenizer) and chat/instruction files, in-process."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tiny import POSITIVE, WORDS

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
EXTRA = ["system", "user", "assistant", "System", "User", "Assistant", "###", ":", "fresh", "rotten",
         "review", "?", "yes", "no", "...", ",", "."]
NEGATIVE = {"bad", "awful", "poor", "hate", "sad", "boring"}


def make_tiny_chat_llama(out: Path, template: str | None = CHATML, layers: int = 2, hidden: int = 32,
                         init_std: float = 0.02) -> Path:
    """Save a tiny random LlamaForCausalLM + word-level tokenizer (with ``template``) to ``out``.

    EOS is ``<|im_end|>`` (as in SmolLM2-Instruct) when the template is ChatML, else ``</s>``.
    A larger ``init_std`` gives a random model whose greedy answers vary (not one token repeated).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(SPECIALS + EXTRA + list(WORDS)))
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIALS)
    eos = "<|im_end|>" if template == CHATML else "</s>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token=eos)
    if template is not None:
        tok.chat_template = template
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True, initializer_range=init_std,
                      bos_token_id=vocab["<s>"], eos_token_id=vocab[eos])
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def review_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-style label rows: 'fresh' iff the review has more positive than negative words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        pos = sum(w in POSITIVE for w in words)
        neg = sum(w in NEGATIVE for w in words)
        rows.append({"instruction": "review ?", "input": " ".join(words), "output": "fresh" if pos > neg else "rotten"})
    return rows


def polarity_rows(n: int, seed: int = 0) -> list[dict]:
    """An easy label task: ``"<noun> <sentiment word>"`` -> fresh / rotten (learnt in ~60 steps)."""
    rng = random.Random(seed)
    words = sorted(POSITIVE | NEGATIVE)
    rows = []
    for _ in range(n):
        w = rng.choice(words)
        noun = rng.choice(["movie", "film", "plot", "story", "scene", "actor"])
        rows.append({"instruction": "review ?", "input": f"{noun} {w}", "output": "fresh" if w in POSITIVE else "rotten"})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
