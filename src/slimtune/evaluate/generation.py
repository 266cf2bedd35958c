"""Does the tuned model do the task? Answer perplexity, exact match, label accuracy, samples.

Held-out chat/instruction data (``slimtune.data.chat``): the last assistant message of each
conversation is the reference answer, everything before it the prompt.

- ``answer_perplexity``: exp(mean NLL) over the answer tokens only, the prompt being context
  (labels -100), with the rendering and masking used in training. Also written as
  ``perplexity`` / ``loss`` / ``tokens`` (so reports and tables that show LM perplexity show it).
- ``exact_match``: generated answer == reference after :func:`normalize_answer` (lower case,
  punctuation removed, whitespace collapsed); computed when every reference is short
  (<= :data:`SHORT_WORDS` words), by greedy generation for every row.
- ``accuracy``, ``macro_f1``, ``per_class``: when the references form a small label set
  (<= :data:`MAX_LABELS` distinct normalised answers). The predicted label is the label that
  appears first, as whole words, in the normalised generated answer (none if no label appears):
  ``"The review is fresh."`` counts as ``fresh``, which zero-shot instruct models need; exact
  match does not give that credit.
- ``samples``: the first few prompts with their reference and generated answers side by side.
"""

from __future__ import annotations

import re
import time
import unicodedata
from typing import Any

import torch

from slimtune.data.chat import ChatRenderer, load_chat, references, tokenize_chat
from slimtune.data.datasets import TokenizedData
from slimtune.evaluate.metrics import classification_metrics, evaluate_causal_lm
from slimtune.runtime.generate import SamplingConfig, generate_ids, prompt_ids

SHORT_WORDS = 5
"""References of at most this many words are short answers: exact match is computed."""
MAX_LABELS = 20
"""At most this many distinct short references make a label set: label accuracy is computed."""


def normalize_answer(text: str) -> str:
    """Lower case, punctuation (Unicode category P*) replaced by spaces, whitespace collapsed."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(text.split())


def find_label(answer: str, labels: list[str]) -> int:
    """Index of the label (normalised) that appears first as whole words in ``answer``
    (normalised), the longer one on a tie; -1 when none appears."""
    best, best_at = -1, None
    for i, lab in enumerate(labels):
        m = re.search(rf"(?<!\w){re.escape(lab)}(?!\w)", answer)
        if m is None:
            continue
        if best_at is None or m.start() < best_at or (m.start() == best_at and len(lab) > len(labels[best])):
            best, best_at = i, m.start()
    return best


def answer_metrics(generated: list[str], refs: list[str]) -> dict[str, Any]:
    """Exact match (short references) and label accuracy (a small label set) of answers."""
    norm_ref = [normalize_answer(r) for r in refs]
    norm_gen = [normalize_answer(g) for g in generated]
    out: dict[str, Any] = {}
    if all(len(r.split()) <= SHORT_WORDS for r in norm_ref):
        out["exact_match"] = sum(g == r for g, r in zip(norm_gen, norm_ref, strict=True)) / len(refs)
        names = sorted(set(norm_ref))
        if len(names) <= MAX_LABELS:
            index = {n: i for i, n in enumerate(names)}
            preds = [find_label(g, names) for g in norm_gen]
            m = classification_metrics(preds, [index[r] for r in norm_ref], names)
            out.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"], per_class=m["per_class"], n=m["n"],
                       no_label=sum(p == -1 for p in preds))
    return out


def evaluate_chat(model: torch.nn.Module, tokenizer: Any, data: TokenizedData, *, batch_size: int = 8,
                  generate_batch_size: int = 16, max_new_tokens: int | None = None, samples: int = 5,
                  template_mode: str = "auto", ppl: dict[str, Any] | None = None) -> dict[str, Any]:
    """Answer perplexity, exact match / label accuracy and samples on tokenized chat eval data.

    Args:
        model: causal LM.
        tokenizer: its tokenizer.
        data: from :func:`slimtune.data.chat.tokenize_chat`, with ``info["references"]``
            (prompts and reference answers; set by ``prepare_chat_data`` / :func:`evaluate_chat_file`).
        batch_size: examples per perplexity batch.
        generate_batch_size: prompts per generation batch.
        max_new_tokens: answer length cap; None: the longest reference (in tokens) + 16.
        samples: how many prompt / reference / generated triples to keep.
        template_mode: the chat template mode used in training (``data.chat_template``).
        ppl: :func:`~slimtune.evaluate.metrics.evaluate_causal_lm` of ``model`` on ``data``
            when already computed (it is the answer perplexity: the labels mask the prompts).
    """
    ppl = ppl or evaluate_causal_lm(model, data, batch_size)
    result: dict[str, Any] = {"answer_perplexity": ppl["perplexity"], "answer_loss": ppl["loss"],
                              "answer_tokens": ppl["tokens"], **ppl,
                              "perplexity_of": "answer tokens only (prompt tokens are context, label -100)"}
    refs = data.info.get("references") or []
    if not refs:
        return result
    if "chat" in data.info:
        result["data"] = data.info["chat"]
    ref_texts = [r["reference"] for r in refs]
    short = all(len(normalize_answer(r).split()) <= SHORT_WORDS for r in ref_texts)
    rows = list(range(len(refs))) if short else list(range(min(samples, len(refs))))
    if max_new_tokens is None:
        longest = max(len(tokenizer(ref_texts[i], add_special_tokens=False)["input_ids"]) for i in rows)
        max_new_tokens = longest + 16
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    ids = [prompt_ids(tokenizer, refs[i]["prompt"], template_mode=template_mode) for i in rows]
    order = sorted(range(len(rows)), key=lambda k: len(ids[k]))
    texts: list[str] = [""] * len(rows)
    t0 = time.perf_counter()
    n_tokens = 0
    for s in range(0, len(order), generate_batch_size):
        chunk = order[s:s + generate_batch_size]
        for k, g in zip(chunk, generate_ids(model, tokenizer, [ids[k] for k in chunk], cfg), strict=True):
            texts[k] = g.text.strip()
            n_tokens += len(g.token_ids)
    seconds = time.perf_counter() - t0
    result.update(answer_metrics(texts, [ref_texts[i] for i in rows]) if short else {})
    result.update(generated=len(rows), generate_seconds=seconds, generated_tokens=n_tokens,
                  max_new_tokens=max_new_tokens)
    result["samples"] = [{"line": refs[i]["line"], "prompt": _last_user(refs[i]["prompt"]),
                          "reference": ref_texts[i], "generated": texts[k]}
                         for k, i in enumerate(rows[:samples])]
    return result


def _last_user(messages: list[dict[str, str]]) -> str:
    text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return text if len(text) <= 300 else text[:297] + "..."


def evaluate_chat_file(model: torch.nn.Module, tokenizer: Any, path: str, *, max_length: int = 512,
                       fmt: str = "auto", template_mode: str = "auto", batch_size: int = 8,
                       skip_bad_rows: bool = False, encoding: str = "utf-8", max_rows: int | None = None,
                       samples: int = 5) -> dict[str, Any]:
    """:func:`evaluate_chat` on a chat/instruction file (what ``slimtune evaluate`` runs for one)."""
    chat = load_chat(path, fmt, skip_bad_rows=skip_bad_rows, encoding=encoding, max_rows=max_rows)
    data = tokenize_chat(chat, tokenizer, max_length, renderer=ChatRenderer(tokenizer, template_mode))
    data.info["references"] = references(chat)
    return evaluate_chat(model, tokenizer, data, batch_size=batch_size, samples=samples,
                         template_mode=template_mode)


def sft_summary(model: torch.nn.Module, tokenizer: Any, train: TokenizedData, eval_data: TokenizedData | None,
                before: dict[str, Any], *, batch_size: int = 8, template_mode: str = "auto",
                ppl: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``slimtune finetune`` adds to ``metrics.json`` for chat/instruction data: the data
    counts, the template, answer perplexity before/after, and the generation metrics."""
    out: dict[str, Any] = {"sft": True, "chat_template": train.info["chat"]["chat_template"],
                           "data": {"train": train.info["chat"]}}
    if eval_data is None:
        return out
    result = evaluate_chat(model, tokenizer, eval_data, batch_size=batch_size, template_mode=template_mode,
                           ppl=ppl)
    out["data"]["eval"] = result.pop("data", eval_data.info.get("chat"))
    out.update(result)
    if before:
        out["answer_perplexity_before"] = before["perplexity"]
    return out
