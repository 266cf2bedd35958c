"""The task data of decoder pruning: calibration/recovery examples, evaluation data, task tokens.

A ``--train`` / ``--eval`` file is either chat/instruction JSONL (:mod:`slimtune.data.chat`:
rendered with the model's chat template, labels on the answer tokens only, as SFT trains) or raw
text (``.txt``: blocks of ``max_length`` tokens, every token labelled). The same readers give
the token ids vocabulary pruning keeps (:func:`task_token_ids`): every token of the files as the
model sees them in training and evaluation, and, for chat files, the generation prompts
(rendered with the assistant header, as ``slimtune generate`` and evaluation tokenize them) and
the whole rendered conversations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from slimtune.data.chat import ChatRenderer, is_chat_data, load_chat, references, tokenize_chat
from slimtune.data.datasets import TokenizedData, read_text_files, tokenize_causal
from slimtune.runtime.generate import prompt_ids

NO_LIMIT = 1 << 30
"""A max_length that never truncates (task tokens are collected from whole examples)."""


def read_examples(path: str, tokenizer: Any, max_length: int, *, max_rows: int | None = None, seed: int = 0,
                  for_eval: bool = False) -> TokenizedData:
    """Tokenized examples of a chat/instruction JSONL (answer-only labels) or a raw text file (blocks).

    With ``for_eval`` a chat file's data carries ``info["references"]`` (prompts and reference
    answers, for :func:`slimtune.evaluate.generation.evaluate_chat`).
    """
    if is_chat_data(path):
        chat = load_chat(path, max_rows=max_rows, seed=seed)
        data = tokenize_chat(chat, tokenizer, max_length, renderer=ChatRenderer(tokenizer, "auto"))
        if for_eval:
            data.info["references"] = references(chat)
        return data
    data = tokenize_causal(read_text_files(path), tokenizer, max_length)
    if max_rows:
        data.input_ids = data.input_ids[:max_rows]
    return data


def task_token_ids(paths: Iterable[str], tokenizer: Any) -> set[int]:
    """Every token id the files use, tokenized as training, evaluation and generation see them."""
    used: set[int] = set()
    for path in paths:
        if is_chat_data(path):
            chat = load_chat(path)
            renderer = ChatRenderer(tokenizer, "auto")
            for ids in tokenize_chat(chat, tokenizer, NO_LIMIT, renderer=renderer).input_ids:
                used.update(ids)
            for conv in chat.conversations:
                used.update(prompt_ids(tokenizer, conv.messages[:-1]))
            texts = [renderer.render(conv.messages) for conv in chat.conversations]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                used.update(ids)
        else:  # raw text, cut exactly as tokenize_causal cuts it (blocks of one token: all of them)
            for block in tokenize_causal(read_text_files(path), tokenizer, 1).input_ids:
                used.update(block)
    return used


def is_chat(path: str | None) -> bool:
    """True for chat/instruction data (answer-only loss, generation metrics)."""
    return path is not None and is_chat_data(path)
