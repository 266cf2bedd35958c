"""Evaluation numbers against references: classifier metrics vs scikit-learn, perplexity vs a
hand computation of exp(mean NLL) over the shifted tokens, with padding and block boundaries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import BERT_VOCAB, LLAMA_VOCAB, bert_classifier

from slimtune.data.datasets import TokenizedData, read_text_files, tokenize_causal
from slimtune.evaluate.evaluator import (
    classification_metrics,
    evaluate_causal_lm,
    evaluate_classifier,
)

metrics_sk = pytest.importorskip("sklearn.metrics")

NAMES = ["neg", "neu", "pos"]
# 12 hand-made predictions over 3 classes: 'neu' (1) is never predicted but has support 3.
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
PREDS = [0, 0, 2, 0, 0, 2, 0, 2, 2, 0, 2, 2]


def _sklearn_report(preds: list[int], labels: list[int], classes: list[int]) -> dict:
    p, r, f, s = metrics_sk.precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
    return {c: {"precision": p[i], "recall": r[i], "f1": f[i], "support": int(s[i])} for i, c in enumerate(classes)}


def test_classification_metrics_match_sklearn_with_a_never_predicted_class() -> None:
    m = classification_metrics(PREDS, LABELS, NAMES)
    assert m["n"] == 12
    assert m["accuracy"] == pytest.approx(metrics_sk.accuracy_score(LABELS, PREDS))  # 7/12
    assert m["accuracy"] == pytest.approx(7 / 12)
    ref = _sklearn_report(PREDS, LABELS, [0, 1, 2])
    assert list(m["per_class"]) == NAMES
    for c, name in enumerate(NAMES):
        got = m["per_class"][name]
        assert got["support"] == ref[c]["support"]
        for k in ("precision", "recall", "f1"):
            assert got[k] == pytest.approx(ref[c][k], abs=1e-12), (name, k)
    assert m["per_class"]["neu"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    # The never-predicted class counts in macro-F1 as a 0 (it has support), as in sklearn.
    assert m["macro_f1"] == pytest.approx(metrics_sk.f1_score(LABELS, PREDS, average="macro", zero_division=0))
    assert m["macro_f1"] == pytest.approx((0.6 + 0 + 8 / 11) / 3)  # neg: p 3/6 r 3/4; pos: p 4/6 r 4/5


def test_macro_f1_skips_a_class_absent_from_labels_and_predictions_like_sklearn() -> None:
    """A 4th label name that occurs nowhere: not part of macro-F1 (sklearn's default labels are
    the classes present in y_true or y_pred); a class only predicted (support 0) counts as 0."""
    names = [*NAMES, "other"]
    m = classification_metrics(PREDS, LABELS, names)
    assert m["per_class"]["other"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx(metrics_sk.f1_score(LABELS, PREDS, average="macro", zero_division=0))
    preds = [*PREDS[:-1], 3]  # one prediction of 'other', which no row has
    m = classification_metrics(preds, LABELS, names)
    ref = _sklearn_report(preds, LABELS, [0, 1, 2, 3])
    for c, name in enumerate(names):
        for k in ("precision", "recall", "f1", "support"):
            assert m["per_class"][name][k] == pytest.approx(ref[c][k], abs=1e-12), (name, k)
    assert m["macro_f1"] == pytest.approx(metrics_sk.f1_score(LABELS, preds, average="macro", zero_division=0))
    assert m["accuracy"] == pytest.approx(metrics_sk.accuracy_score(LABELS, preds))
    with pytest.raises(ValueError, match="11 predictions for 12 labels"):
        classification_metrics(PREDS[:-1], LABELS, NAMES)


def test_evaluate_classifier_matches_one_example_at_a_time() -> None:
    """Batched, length-sorted, padded evaluation == a plain unpadded forward per example, with
    accuracy/macro-F1 from sklearn and the loss from torch's cross-entropy (file order kept).
    Weights at std 0.5, not 0.02: this random model predicts class 1 for 15 of the 40 rows."""
    model = bert_classifier(vocab_size=len(BERT_VOCAB), initializer_range=0.5, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    ids = [[2, *torch.randint(5, len(BERT_VOCAB), (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist(), 3]
           for _ in range(40)]
    labels = [int(x) for x in torch.randint(0, 2, (40,), generator=g)]
    data = TokenizedData(ids, None, labels, pad_id=0)
    got = evaluate_classifier(model, data, ["0", "1"], batch_size=8)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([x])).logits for x in ids])
    preds = logits.argmax(-1).tolist()
    assert 0 < sum(preds) < 40  # both classes predicted: the comparison is not trivial
    assert got["accuracy"] == pytest.approx(metrics_sk.accuracy_score(labels, preds))
    assert got["macro_f1"] == pytest.approx(metrics_sk.f1_score(labels, preds, average="macro", zero_division=0))
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, torch.tensor(labels)).item(), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def _hand_nll(model: torch.nn.Module, blocks: list[list[int]]) -> tuple[float, int]:
    """Sum of -log p(token t+1 | tokens <= t) within each block, alone and unpadded; token count.

    A block's first token is never predicted (nothing of the previous block is context)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logits = model(input_ids=torch.tensor([b])).logits[0].double()
            total += F.cross_entropy(logits[:-1], torch.tensor(b[1:]), reduction="sum").item()
            tokens += len(b) - 1
    return total, tokens


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    from slimtune.models.loading import load_model, load_tokenizer

    return load_model(str(tiny_llama_dir), "causal-lm").eval(), load_tokenizer(str(tiny_llama_dir))


def test_perplexity_of_text_blocks_is_exp_of_the_hand_mean_nll(llama, tiny_corpus) -> None:
    model, tok = llama
    text = read_text_files(tiny_corpus)
    block = 16
    data = tokenize_causal(text, tok, block)
    # The reference blocks, from the raw token stream: paragraphs joined by a blank line, EOS at
    # the end, cut into full blocks of 16, the tail dropped.
    pieces = [p for p in text.split("\n\n") if p.strip()]
    stream = tok(["\n\n".join(pieces)], add_special_tokens=False)["input_ids"][0] + [tok.eos_token_id]
    blocks = [stream[i:i + block] for i in range(0, len(stream) - block + 1, block)]
    assert data.input_ids == blocks and len(blocks) > 10
    total, tokens = _hand_nll(model, blocks)
    got = evaluate_causal_lm(model, data, batch_size=4)
    assert got["tokens"] == tokens == len(blocks) * (block - 1)
    assert got["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert 20 < got["perplexity"] < 60  # a random LM over 34 tokens: about the vocabulary size


def test_perplexity_ignores_padding_of_unequal_blocks(llama) -> None:
    """Blocks of different lengths batched together: padded positions add neither loss nor tokens."""
    model, _ = llama
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randint(3, len(LLAMA_VOCAB), (n,), generator=g).tolist() for n in (9, 3, 16, 2, 11, 16, 5)]
    data = TokenizedData(blocks, None, None, pad_id=2, causal=True)
    total, tokens = _hand_nll(model, blocks)
    for bs in (1, 3, 7):  # alone, mixed lengths, all in one padded batch
        got = evaluate_causal_lm(model, data, batch_size=bs)
        assert got["tokens"] == tokens == sum(len(b) - 1 for b in blocks)
        assert got["loss"] == pytest.approx(total / tokens, rel=1e-5), bs
        assert got["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5), bs
