"""``bench/peers.py`` on tiny data: every peer row is scored, sized and timed in one run, the numbers
match an independent recomputation, a peer that cannot be built is skipped with its reason, and
the dominance verdict is what its definition says."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from slimtune.compress.distill.static import StaticSettings, run_static
from slimtune.evaluate.evaluator import evaluate_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _peers():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "bench" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("peers")
    teacher = tiny_assets.bert(layers=2, hidden=32, id2label={0: "0", 1: "1"})
    train, test = tiny_assets.separable_csv(120, 0), tiny_assets.separable_csv(40, 1)
    run_static(StaticSettings(model=str(teacher), train=str(train), output=str(root / "S16"), dims=16, epochs=5,
                              cache_dir=str(root / "cache")))
    out = root / "peers.json"
    rc = _peers().main(["--train", str(train), "--test", str(test), "--teacher", str(teacher),
                        "--slimtune", str(root / "S16"), "--base", str(root / "not-a-model"),
                        "--peers", "tfidf-logreg,model2vec,fasttext,ort-int8", "--latency-texts", "8",
                        "--pad-to", "32", "--work", str(root / "work"), "--out", str(out)])
    assert rc == 0
    return {"result": json.loads(out.read_text()), "train": train, "test": test, "teacher": teacher,
            "static": root / "S16"}


def test_every_row_is_scored_sized_and_timed(run: dict) -> None:
    r = run["result"]
    have_fasttext = importlib.util.find_spec("fasttext") is not None  # scripts/install.sh installs fasttext-wheel
    assert set(r["rows"]) == {"tfidf-logreg", "ort-int8", "teacher", "slimtune:S16"} | ({"fasttext"} if have_fasttext else set())
    assert have_fasttext or "fasttext" in r["skipped"]  # a missing peer is skipped with its reason
    assert "model2vec" in r["skipped"]  # --base is not a model: skipped with the reason, the run goes on
    for name, row in r["rows"].items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["size_mb"] > 0, name
        assert row["latency_real"]["n"] == 8 and row["latency_real"]["p50_ms"] > 0, name
        text_model = row["kind"] == "text"
        assert (row["latency_pad128"] is None) == text_model, name  # padding applies to token-id models only
    assert r["rows"]["slimtune:S16"]["kind"] == "static" and r["rows"]["ort-int8"]["kind"] == "onnx"
    assert r["rows"]["slimtune:S16"]["family"] == "slimtune" and r["rows"]["tfidf-logreg"]["family"] == "peer"
    assert r["test_rows"] == 40 and r["train_rows"] == 120


def test_numbers_match_an_independent_recomputation(run: dict) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from slimtune.data.datasets import load_classification

    r = run["result"]["rows"]
    tr = load_classification(run["train"])
    te = load_classification(run["test"], label_names=tr.label_names)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(vec.fit_transform(tr.texts), tr.labels)
    acc = float((clf.predict(vec.transform(te.texts)) == te.labels).mean())
    assert r["tfidf-logreg"]["accuracy"] == pytest.approx(acc)
    for name in ("teacher", "slimtune:S16"):
        assert r[name]["accuracy"] == pytest.approx(evaluate_model_dir(r[name]["path"], str(run["test"]))["accuracy"])
    assert r["slimtune:S16"]["size_mb"] == pytest.approx((run["static"] / "model.safetensors").stat().st_size / 1e6)
    files = r["tfidf-logreg"]["files"]
    assert r["tfidf-logreg"]["size_mb"] == pytest.approx(sum(Path(f).stat().st_size for f in files) / 1e6)


def test_dominance_is_its_definition(run: dict) -> None:
    peers = _peers()
    rows = {"p": {"family": "peer", "accuracy": 0.8, "size_mb": 1.0, "latency_real": {"p50_ms": 1.0}},
            "a": {"family": "slimtune", "accuracy": 0.8, "size_mb": 1.0, "latency_real": {"p50_ms": 1.0}},
            "slow": {"family": "slimtune", "accuracy": 0.9, "size_mb": 0.5, "latency_real": {"p50_ms": 1.1}},
            "big": {"family": "slimtune", "accuracy": 0.9, "size_mb": 1.5, "latency_real": {"p50_ms": 0.5}},
            "worse": {"family": "slimtune", "accuracy": 0.79, "size_mb": 0.1, "latency_real": {"p50_ms": 0.1}},
            "t": {"family": "teacher", "accuracy": 0.99, "size_mb": 0.1, "latency_real": {"p50_ms": 0.1}}}
    assert peers.dominance(rows) == {"p": ["a"]}  # ties count; the teacher is not a candidate
    got = run["result"]["dominated_by_slimtune"]
    rr = run["result"]["rows"]
    for peer, who in got.items():
        p = rr[peer]
        expect = [n for n, c in rr.items() if c["family"] == "slimtune" and c["accuracy"] >= p["accuracy"]
                  and c["size_mb"] <= p["size_mb"] and c["latency_real"]["p50_ms"] <= p["latency_real"]["p50_ms"]]
        assert who == expect, peer
