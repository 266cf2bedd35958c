"""A tiny byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) and a tiny chat Llama using it, in-process."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from helpers_chat import CHATML
from tiny import WORDS, llama_lm

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer(texts: list[str], vocab_size: int = 420) -> Any:
    """A byte-level BPE (GPT-2 style, as SmolLM2's) trained in-process on ``texts``, with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    extra = ["review", "fresh", "rotten", "Is", "this", "positive", "negative", "?", "answer"]
    return [" ".join(rng.choice(WORDS + extra) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def make_bpe_chat_llama(out: Path, layers: int = 4, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM (GQA: 6 query heads in 2 KV groups, tied) + byte-level BPE + ChatML."""
    tok = bpe_tokenizer(corpus())
    model = llama_lm(vocab_size=len(tok), hidden=48, layers=layers, heads=6, kv_heads=2, intermediate=64,
                     max_positions=256, tie_word_embeddings=True, seed=seed, initializer_range=0.2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
