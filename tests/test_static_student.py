"""Static-embedding students (``slimtune.compress.distill.static``) on a tiny BERT teacher: the
table is model2vec's recipe on the teacher's encoder, KD lowers the objective, the saved folder
predicts exactly what the trained module did, and a hand-written numpy reading of the files
(the one ``slimtune.runtime.static`` documents) gives the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from slimtune.compress.distill.static import (
    StaticClassifier,
    StaticSettings,
    pca_reduce,
    restore_static,
    run_static,
    sif_weights,
    special_ids,
    token_vectors,
)
from slimtune.evaluate.evaluator import evaluate_model_dir
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.runtime.classifier import load_predict
from slimtune.runtime.folders import count_stored_params, model_kind

TEXTS = ["good great film", "the plot was bad and boring", "not really a nice movie , but fine",
         "awful", "[UNK] love love love the actor ."]


@pytest.fixture(scope="module")
def teacher(tiny_assets) -> Path:
    return tiny_assets.bert(layers=2, hidden=32, id2label={0: "neg", 1: "pos"})


@pytest.fixture(scope="module")
def trained(teacher: Path, tiny_assets, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("static") / "s16"
    s = StaticSettings(model=str(teacher), train=str(tiny_assets.tsv(128, names=("neg", "pos"))), output=str(out),
                       dims=16, storage="float32", epochs=20, lr=1e-2, batch_size=16, val_fraction=0.0,
                       eval=str(tiny_assets.tsv(40, 1, names=("neg", "pos"))),
                       cache_dir=str(tmp_path_factory.mktemp("cache")))
    return out, run_static(s)


def _numpy_reference(folder: Path, texts: list[str]) -> np.ndarray:
    """The recipe of the runtime's docstring, written out: safetensors.numpy + the tokenizer, no slimtune."""
    t = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    table = t["embeddings"].astype(np.float32)
    if "embedding_scales" in t:
        table = table * t["embedding_scales"][:, None]
    tok = AutoTokenizer.from_pretrained(str(folder))
    ignore = set(cfg["ignore_ids"])
    rows = []
    for text in texts:
        ids = [i for i in tok(text)["input_ids"] if i not in ignore]
        pooled = table[ids].mean(0) if ids else np.zeros(table.shape[1], np.float32)
        rows.append(t["head.weight"] @ pooled + t["head.bias"])
    return np.stack(rows)


def test_token_vectors_are_the_encoder_on_each_token(teacher: Path) -> None:
    model, tok = load_model(str(teacher), "classification").eval(), load_tokenizer(str(teacher))
    vec = token_vectors(model.base_model, tok, batch_size=7)  # batches of 7: the last one is partial
    assert vec.shape == (len(tok), 32)
    for t in (5, 17, len(tok) - 1):
        x = torch.tensor([[tok.cls_token_id, t, tok.sep_token_id]])
        with torch.no_grad():
            ref = model.base_model(input_ids=x).last_hidden_state[0].mean(0)
        torch.testing.assert_close(vec[t], ref, atol=1e-5, rtol=1e-5)
    assert torch.all(vec[special_ids(tok)] == 0)


def test_pca_and_sif_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) @ torch.randn(8, 8, generator=g)
    got = pca_reduce(x, 3).numpy()
    xc = x.numpy().astype(np.float64) - x.numpy().mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xc, rowvar=False))  # covariance eigenvectors, ascending
    ref = xc @ evecs[:, ::-1][:, :3]
    np.testing.assert_allclose(np.abs(got), np.abs(ref), atol=1e-4)  # axes are defined up to sign
    assert got.var(0)[0] > got.var(0)[1] > got.var(0)[2]
    counts = torch.tensor([0.0, 10.0, 3.0, 3.0])  # ranks: id1, id2, id3 (tie -> id order), id0
    ranks = np.array([3, 0, 1, 2])
    p = 1 / (ranks + 2)
    p = p / p.sum()
    np.testing.assert_allclose(sif_weights(counts, 1e-2).numpy(), 1e-2 / (1e-2 + p), rtol=1e-6)


def test_output_shape_and_pooling_skips_padding_and_specials() -> None:
    table = torch.arange(24, dtype=torch.float).reshape(6, 4)
    keep = torch.tensor([False, True, True, True, True, False])  # ids 0 and 5 are never pooled
    m = StaticClassifier(table, 3, keep)
    ids = torch.tensor([[5, 1, 2, 0], [3, 5, 0, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert m(ids, mask).shape == (3, 3)
    pooled = m.pooled(ids, mask)
    torch.testing.assert_close(pooled[0], (table[1] + table[2]) / 2)
    torch.testing.assert_close(pooled[1], table[3])
    torch.testing.assert_close(pooled[2], torch.zeros(4))  # nothing pooled: zeros, not NaN


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory: pytest.TempPathFactory, tiny_assets) -> Path:
    """A random tiny BERT whose classifier splits the training texts along the main axis of its
    pooled outputs, 30x scaled: confident, text-dependent soft labels to learn."""
    import tiny

    d = tiny.make_tiny_bert(tmp_path_factory.mktemp("sharp") / "t", seed=3, id2label={0: "neg", 1: "pos"})
    m, tok = load_model(str(d), "classification").eval(), load_tokenizer(str(d))
    texts = [line.split("\t")[0] for line in tiny_assets.tsv(128, names=("neg", "pos")).read_text().splitlines()[1:]]
    with torch.no_grad():
        pooled = m.bert(**tok(texts, padding=True, return_tensors="pt")).pooler_output
        mu = pooled.mean(0)
        u = torch.linalg.svd(pooled - mu, full_matrices=False).Vh[0]
        u = 30.0 * u / (pooled - mu).matmul(u).std()
        m.classifier.weight.copy_(torch.stack([-u, u]))
        m.classifier.bias.copy_(torch.stack([mu @ u, -(mu @ u)]))
    m.save_pretrained(d)
    return d


def test_kd_lowers_the_objective_and_copies_the_teacher(sharp_teacher: Path, tiny_assets, tmp_path: Path) -> None:
    """Pure KD (alpha 0): the KL to the teacher falls well below the untrained student's, and the
    student's labels agree with the teacher's on most training texts."""
    train = tiny_assets.tsv(128, names=("neg", "pos"))
    out = tmp_path / "s"
    r = run_static(StaticSettings(model=str(sharp_teacher), train=str(train), output=str(out), dims=16,
                                  storage="float32", epochs=20, lr=1e-2, batch_size=16, alpha=0.0, val_fraction=0.0,
                                  cache_dir=str(tmp_path / "cache")))
    assert r["loss_after"] < 0.6 * r["loss_before"], r
    texts = [line.split("\t")[0] for line in train.read_text().splitlines()[1:]]
    t_model, t_tok = load_model(str(sharp_teacher), "classification").eval(), load_tokenizer(str(sharp_teacher))
    with torch.no_grad():
        t_pred = t_model(**t_tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1).numpy()
    constant = max(t_pred.mean(), 1 - t_pred.mean())  # agreement of the best constant guess
    assert constant < 0.7, constant  # the teacher is not constant: copying it is a real task
    agree = float((_numpy_reference(out, texts).argmax(-1) == t_pred).mean())
    print("agree", agree, "constant", constant)
    assert agree >= constant + 0.15, (agree, constant)


def test_hard_and_soft_labels_learn_the_task(trained: tuple[Path, dict]) -> None:
    out, r = trained
    assert r["loss_after"] < r["loss_before"], r
    assert r["eval"]["accuracy"] >= 0.8, r["eval"]  # the toy task is learnable from 128 rows
    assert (r["vocab_size"], r["dims"]) == (36, 16)
    assert model_kind(out) == "static"
    assert count_stored_params(out) == 36 * 16 + 2 * 16 + 2


def test_early_stopping_keeps_the_best_held_out_epoch(teacher: Path, tiny_assets) -> None:
    from slimtune.compress.distill.static import accuracy, holdout, subset, train_static
    from slimtune.data.datasets import load_classification, tokenize_classification

    tok = load_tokenizer(str(teacher))
    rows = load_classification(tiny_assets.tsv(128, names=("neg", "pos")), label_names=["neg", "pos"])
    data = tokenize_classification(rows, tok, 32)
    tr, val = holdout(data.labels, 0.25, 0)
    assert sorted(tr + val) == list(range(128)) and not set(tr) & set(val)
    for y in (0, 1):  # stratified: each label's share is held out
        n_y = sum(1 for v in data.labels if v == y)
        assert sum(1 for i in val if data.labels[i] == y) == round(0.25 * n_y)
    g = torch.Generator().manual_seed(0)
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[special_ids(tok)] = False
    m = StaticClassifier(torch.randn(len(tok), 8, generator=g), 2, keep)
    logits = torch.randn(128, 2, generator=g)
    r = train_static(m, subset(data, tr), logits[tr], epochs=30, lr=0.05, batch_size=8, alpha=0.5,
                     temperature=2.0, val=subset(data, val), patience=2)
    curve = r["val_accuracy"]
    assert r["epochs_run"] == len(curve) and r["best_epoch"] == 1 + curve.index(max(curve))
    assert r["epochs_run"] == 30 or r["epochs_run"] == r["best_epoch"] + 2  # stopped after 2 epochs without a gain
    assert accuracy(m, subset(data, val)) == pytest.approx(max(curve))  # the best epoch's weights are kept


def test_saved_folder_predicts_what_the_module_did(trained: tuple[Path, dict], teacher: Path) -> None:
    out, _ = trained
    t = load_file(str(out / "model.safetensors"))
    keep = torch.ones(36, dtype=torch.bool)
    keep[special_ids(load_tokenizer(str(teacher)))] = False
    m = StaticClassifier(torch.from_numpy(t["embeddings"]), 2, keep)
    m.head.weight.data, m.head.bias.data = torch.from_numpy(t["head.weight"]), torch.from_numpy(t["head.bias"])
    predict, tok = load_predict(out)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = m(enc["input_ids"], enc["attention_mask"])
    got = predict(dict(enc))
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_numpy_reference_and_evaluate_agree(trained: tuple[Path, dict], tiny_assets) -> None:
    out, r = trained
    predict, tok = load_predict(out)
    enc = tok(TEXTS, padding="max_length", max_length=24, return_tensors="pt")  # padding changes nothing
    np.testing.assert_allclose(predict(dict(enc)).numpy(), _numpy_reference(out, TEXTS), atol=1e-5, rtol=1e-5)
    # evaluate (length-sorted batches, any folder) == argmax of the hand reference over the file
    ev_file = tiny_assets.tsv(40, 1, names=("neg", "pos"))
    rows = [line.split("\t") for line in ev_file.read_text().splitlines()[1:]]
    pred = _numpy_reference(out, [t for t, _ in rows]).argmax(-1)
    acc = float(np.mean([["neg", "pos"][p] == y for p, (_, y) in zip(pred, rows, strict=True)]))
    assert evaluate_model_dir(out, str(ev_file))["accuracy"] == pytest.approx(acc)
    assert r["eval"]["accuracy"] == pytest.approx(acc)


def test_int8_rows_shrink_the_table_and_keep_predictions(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = trained
    info = restore_static(out, tmp_path / "q", "int8")
    q = tmp_path / "q"
    assert json.loads((q / "config.json").read_text())["storage"] == "int8"
    assert count_stored_params(q) == count_stored_params(out)
    assert info["size_mb"] < 0.5 * (out / "model.safetensors").stat().st_size / 1e6 + 1e-3
    ref, got = _numpy_reference(out, TEXTS), _numpy_reference(q, TEXTS)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max() + 1e-4  # 8-bit rows: ~0.4% per weight
    predict, tok = load_predict(q)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    np.testing.assert_allclose(predict(dict(enc)).numpy(), got, atol=1e-5, rtol=1e-5)


def test_served_through_the_server_runner(trained: tuple[Path, dict]) -> None:
    from slimtune.serve.models import load_runner, pad_batch

    out, _ = trained
    runner = load_runner(str(out))
    encs = [dict(runner.tokenizer(t)) for t in TEXTS]
    logits = runner.logits(pad_batch(encs, runner.tokenizer.pad_token_id))
    np.testing.assert_allclose(np.asarray(logits), _numpy_reference(out, TEXTS), atol=1e-5, rtol=1e-5)
    assert runner.label_names == ["neg", "pos"]
