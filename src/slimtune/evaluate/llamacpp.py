"""The task metrics of :mod:`slimtune.evaluate.generation` for a GGUF model run by llama.cpp.

The token ids, answer masks and references come from the same :class:`TokenizedData` the
transformers path evaluates (the HF tokenizer of the folder the GGUF was made from), so the two
backends are scored on identical inputs: perplexity over the labelled positions (answers only
for chat data, every token for text) and greedy answers scored by
:func:`~slimtune.evaluate.generation.answer_metrics`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from slimtune.data.datasets import TokenizedData
from slimtune.evaluate.generation import SHORT_WORDS, answer_metrics, normalize_answer
from slimtune.runtime.generate import SamplingConfig, prompt_ids


def llamacpp_perplexity(model: Any, data: TokenizedData) -> dict[str, Any]:
    """Mean NLL and perplexity over the labelled next-token positions of ``data``.

    Args:
        model: a :class:`~slimtune.runtime.llamacpp.LlamaCppModel` opened with ``logits_all=True``
            and a context at least as long as the longest example.
        data: causal tokenized data; ``token_labels`` (-100 = no loss) when present, else every
            token is a target (as in :func:`slimtune.evaluate.metrics.evaluate_causal_lm`).
    """
    nll, count = 0.0, 0
    for i, ids in enumerate(data.input_ids):
        labels = np.asarray(data.token_labels[i] if data.token_labels is not None else ids)
        pos = np.nonzero(labels[1:] != -100)[0]  # the logits at t predict token t + 1
        if not len(pos):
            continue
        lg = model.logits([int(t) for t in ids])[pos].astype(np.float64)
        top = lg.max(-1)
        lse = np.log(np.exp(lg - top[:, None]).sum(-1)) + top
        nll += float((lse - lg[np.arange(len(pos)), labels[pos + 1]]).sum())
        count += len(pos)
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def llamacpp_answers(model: Any, tokenizer: Any, refs: list[dict[str, Any]], max_new_tokens: int) -> list[str]:
    """Greedy answers to each reference's prompt (rendered and tokenized by ``tokenizer``)."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    return [model.generate(prompt_ids(tokenizer, r["prompt"]), cfg)[0].text.strip() for r in refs]


def evaluate_chat_llamacpp(open_model: Any, tokenizer: Any, data: TokenizedData) -> dict[str, Any]:
    """Answer perplexity and, for short references, exact match / label accuracy.

    Args:
        open_model: ``open_model(logits_all: bool, n_ctx: int)`` -> an opened LlamaCppModel (two
            are opened: llama.cpp keeps every position's logits only when asked, which is slower).
        tokenizer: the HF tokenizer the ids in ``data`` come from.
        data: chat data from :func:`slimtune.data.chat.tokenize_chat` with ``info["references"]``.
    """
    n_ctx = max(len(x) for x in data.input_ids) + 64
    model = open_model(True, n_ctx)
    try:
        ppl = llamacpp_perplexity(model, data)
    finally:
        model.close()
    out: dict[str, Any] = {"answer_perplexity": ppl["perplexity"], "answer_loss": ppl["loss"],
                           "answer_tokens": ppl["tokens"], **ppl,
                           "perplexity_of": "answer tokens only (prompt tokens are context, label -100)"}
    refs = data.info.get("references") or []
    texts = [r["reference"] for r in refs]
    if not refs or not all(len(normalize_answer(t).split()) <= SHORT_WORDS for t in texts):
        return out
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    model = open_model(False, n_ctx + longest + 16)
    try:
        answers = llamacpp_answers(model, tokenizer, refs, longest + 16)
    finally:
        model.close()
    out.update(answer_metrics(answers, texts))
    out.update(generated=len(answers), max_new_tokens=longest + 16,
               samples=[{"line": r["line"], "prompt": str(r["prompt"][-1]["content"])[:300], "reference": t, "generated": a}
                        for r, t, a in list(zip(refs, texts, answers, strict=True))[:5]])
    return out
