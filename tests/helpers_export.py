"""A tiny Llama with a real byte-level BPE tokenizer (trained in-process), for the export tests.

GGUF holds byte-level BPE tokenizers (llama.cpp's ``gpt2`` model), so the word-level tokenizer
of ``tiny.make_tiny_llama`` cannot be exported; this one is trained on the toy corpus with the
``tokenizers`` library (a few hundred merges, specials ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, the ChatML template), and the Llama is sized by keyword so a test can ask for
odd shapes (FFN width not a multiple of 32, GQA, a vocabulary with unused rows).
"""

from __future__ import annotations

from pathlib import Path

from helpers_chat import CHATML
from tiny import WORDS

BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "the movie was very good .", "the plot is not bad , but boring .", "an actor and a story .",
    "really great film , love the scene .", "Is 12 + 30 = 42? Yes, it's 42!",
    "The quick brown fox jumps over the lazy dog.", " ".join(WORDS),
]


def bpe_tokenizer(vocab_size: int = 400, digits: bool = False):  # noqa: ANN201
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :data:`TEXTS` (ChatML template).

    ``digits`` splits digits one by one first (SmolLM2's pre-tokenizer; llama.cpp ``smollm``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if digits else byte_level)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS * 20, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def make_bpe_llama(out: Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                   intermediate: int = 96, extra_rows: int = 0, tied: bool = True, init_std: float = 0.1,
                   digits: bool = False, seed: int = 0) -> Path:
    """Save a random LlamaForCausalLM + byte-level BPE tokenizer folder to ``out``.

    ``extra_rows`` embedding rows no token uses (GGUF writes them as unused ``[PAD<i>]`` tokens);
    a larger ``init_std`` than transformers' 0.02 gives logits with clear winners, so greedy
    tokens do not hinge on float rounding.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = bpe_tokenizer(digits=digits)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok) + extra_rows, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, tie_word_embeddings=tied, initializer_range=init_std,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def assert_llamacpp_logits_close(gguf_path: Path, model: object, ids: list[int]) -> None:
    """llama.cpp's logits on ``gguf_path`` within 5% of max of ``model``'s, arg-max agreeing on >= 90%."""
    import numpy as np
    import torch

    from slimtune.runtime.llamacpp import LlamaCppModel

    lm = LlamaCppModel(gguf_path, n_threads=1, logits_all=True)
    try:
        got = lm.logits(ids)
    finally:
        lm.close()
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
