"""The small, fast classifiers a user could pick instead of slimtune, beside slimtune's candidates, in ONE run.

Rows, all trained on the same ``--train`` rows and scored on the same ``--test`` file:

- ``tfidf-logreg``: scikit-learn ``TfidfVectorizer`` (word 1-2 grams, sublinear tf, min_df 2) +
  ``LogisticRegression`` (lbfgs, C=10); stored as vocabulary JSON + safetensors arrays;
- ``model2vec``: ``model2vec.distill`` of the *base* encoder (``--base``, default the packaged
  MiniLM, PCA 256) + its own classifier trainer (``StaticModelForClassification.fit``: MLP head,
  early stopping on a 10% split), saved with ``save_pretrained``;
- ``fasttext`` / ``fasttext-ftz``: ``fasttext.train_supervised`` (25 epochs, lr 0.5, word
  bigrams, dim 50) and its ``quantize()``-d ``.ftz``;
- ``ort-int8``: the fine-tuned ``--teacher`` exported to ONNX, fused, ONNX Runtime dynamic int8
  (per channel, embeddings included: slimtune's writer, the best plain ORT recipe);
- ``teacher``: the fp32 fine-tune itself (the reference);
- ``slimtune:NAME``: every ``--slimtune`` folder: a model folder, or a ``slimtune compress``
  output (every built candidate in its ``candidates.json``).

A peer that cannot be built (package missing, error) is skipped with the reason printed and kept
in the JSON. Latency is END TO END, text in, label out (tokenizer or vectorizer included), batch
1, ``--threads`` threads, timed interleaved round by round (every model gets the same text in a
round, in a fresh random order each round: see :func:`interleaved`) over ``--latency-texts`` test texts
**as they come** (real lengths) and, for the models that take token ids, **padded to 128**
tokens (text models have no padding: null there). Size: the bytes a user ships (weights,
vectorizer or vocabulary files; tokenizer files of the transformers are not counted, as in
``slimtune bench``). Accuracy: every test row (token models through
:func:`slimtune.evaluate.evaluator.evaluate_model_dir` at ``--max-length``).

Then, for each peer, the slimtune candidates that dominate it (at most as slow at real lengths,
at most as large, at least as accurate): the issue-22 target.

Usage (as quiet a machine as you can get)::

    nice python bench/peers.py --train TRAIN --test TEST --teacher TEACHER --slimtune OUT \\
        --out bench/results/peers_NAME.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimtune.benchmark.timing import hardware_fingerprint, set_threads
from slimtune.data.datasets import load_classification
from slimtune.data.packaged import expand
from slimtune.evaluate.evaluator import evaluate_model_dir
from slimtune.evaluate.metrics import classification_metrics
from slimtune.io import atomic_write_json, weights_size_mb
from slimtune.models.loading import load_model, load_tokenizer, resolve
from slimtune.runtime.classifier import load_predict
from slimtune.runtime.folders import count_stored_params, model_kind

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TextPredict = Callable[[list[str]], list[int]]  # texts -> label ids (in the train file's label order)


def say(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def files_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


# --------------------------------------------------------------------------------------------
# Text peers: each returns a row {"predict": texts -> ids, "size_mb", "files", "train_seconds", "settings"}
# --------------------------------------------------------------------------------------------


def tfidf_peer(texts: list[str], labels: list[int], work: Path, threads: int) -> dict[str, Any]:
    from safetensors.numpy import save_file  # only this peer writes numpy safetensors
    from sklearn.feature_extraction.text import TfidfVectorizer  # optional peer (dev extra)
    from sklearn.linear_model import LogisticRegression  # optional peer (dev extra)

    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, dtype=np.float32)
    x = vec.fit_transform(texts)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x, labels)
    seconds = time.perf_counter() - t0
    d = work / "tfidf-logreg"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocabulary.json").write_text(json.dumps({k: int(v) for k, v in vec.vocabulary_.items()}))
    save_file({"idf": vec.idf_.astype(np.float32), "coef": clf.coef_.astype(np.float32),
               "intercept": clf.intercept_.astype(np.float32)}, str(d / "model.safetensors"))
    files = [d / "vocabulary.json", d / "model.safetensors"]

    def predict(batch: list[str]) -> list[int]:
        return [int(c) for c in clf.predict(vec.transform(batch))]

    return {"predict": predict, "size_mb": files_mb(files), "files": [str(p) for p in files],
            "train_seconds": round(seconds, 2), "params": int(clf.coef_.size + clf.intercept_.size + vec.idf_.size),
            "settings": "TfidfVectorizer(ngram_range=(1,2), sublinear_tf, min_df=2) + LogisticRegression(C=10)"}


def fasttext_peers(texts: list[str], labels: list[int], work: Path, threads: int, seed: int,
                   ftz: bool = True) -> list[tuple[str, dict[str, Any]]]:
    import fasttext  # optional peer: pip install fasttext-wheel

    d = work / "fasttext"
    d.mkdir(parents=True, exist_ok=True)
    train = d / "train.txt"
    train.write_text("".join(f"__label__{y} {' '.join(t.split())}\n" for t, y in zip(texts, labels, strict=True)))
    t0 = time.perf_counter()
    model = fasttext.train_supervised(str(train), epoch=25, lr=0.5, wordNgrams=2, dim=50, minCount=1,
                                      bucket=200000, thread=threads, seed=seed, verbose=0)
    seconds = time.perf_counter() - t0
    model.save_model(str(d / "model.bin"))

    def predictor(m: Any) -> TextPredict:
        def predict(batch: list[str]) -> list[int]:
            out, _ = m.predict([" ".join(t.split()) for t in batch])
            return [int(lab[0].removeprefix("__label__")) for lab in out]
        return predict

    rows = [("fasttext", {"predict": predictor(model), "size_mb": files_mb([d / "model.bin"]),
                          "files": [str(d / "model.bin")], "train_seconds": round(seconds, 2),
                          "settings": "train_supervised(epoch=25, lr=0.5, wordNgrams=2, dim=50, bucket=200000)"})]
    if not ftz:
        return rows
    t0 = time.perf_counter()
    model.quantize(input=str(train), qnorm=True, retrain=True, cutoff=100000, thread=threads, verbose=0)
    q_seconds = time.perf_counter() - t0
    model.save_model(str(d / "model.ftz"))
    rows.append(("fasttext-ftz", {"predict": predictor(model), "size_mb": files_mb([d / "model.ftz"]),
                                  "files": [str(d / "model.ftz")], "train_seconds": round(seconds + q_seconds, 2),
                                  "settings": "the above + quantize(qnorm, retrain, cutoff=100000)"}))
    return rows


def model2vec_peer(texts: list[str], labels: list[int], work: Path, base: str, seed: int) -> dict[str, Any]:
    from model2vec.distill import distill  # optional peer: pip install --no-deps model2vec
    from model2vec.inference import StaticModelPipeline  # optional peer
    from model2vec.train import StaticModelForClassification  # optional peer (needs datasets)

    t0 = time.perf_counter()
    static = distill(model_name=base, pca_dims=256, device="cpu")
    distill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    clf = StaticModelForClassification.from_static_model(model=static)
    clf.fit(texts, [str(y) for y in labels], random_seed=seed, device="cpu")
    fit_seconds = time.perf_counter() - t0
    d = work / "model2vec"
    clf.to_pipeline().save_pretrained(str(d))
    pipe = StaticModelPipeline.from_pretrained(str(d))  # what a user ships and loads
    files = [p for p in d.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
             and p.name not in ("tokenizer.json", "config.json", "modules.json")]

    def predict(batch: list[str]) -> list[int]:
        return [int(c) for c in pipe.predict(batch, use_multiprocessing=False)]

    return {"predict": predict, "size_mb": files_mb(files), "files": [str(p) for p in files],
            "train_seconds": round(distill_seconds + fit_seconds, 2),
            "distill_seconds": round(distill_seconds, 2), "fit_seconds": round(fit_seconds, 2),
            "settings": f"distill({Path(base).name}, pca_dims=256) + StaticModelForClassification.fit (defaults)"}


def ort_int8_folder(teacher: str, work: Path) -> Path:
    from slimtune.compress.quant.onnx import write_onnx_folder  # optional: the quant extra (onnx)

    d = work / "ort-int8"
    write_onnx_folder(load_model(teacher, "classification").eval(), d, load_tokenizer(teacher), quantize=True)
    return d


# --------------------------------------------------------------------------------------------
# Token-id models (teacher, ORT int8, slimtune folders): one tokenizer call + the folder's runtime
# --------------------------------------------------------------------------------------------


def token_runner(folder: str, threads: int, max_length: int, pad_to: int | None = None) -> tuple[TextPredict, Any]:
    """``texts -> label ids`` through the folder's tokenizer and runtime (:func:`load_predict`);
    ``pad_to`` pads every text to that many tokens. Also returns the predict (for its config).

    Texts are encoded by the ``tokenizers`` backend directly (as model2vec does): the Python
    wrapper of transformers' tokenizers adds ~0.1-0.3 ms a call that any server can skip, and
    would otherwise dominate the static models' latency. Same path for every token-id model.
    """
    predict, tok = load_predict(folder, threads)
    cfg = getattr(predict, "config", {}) or {}
    types = int(cfg.get("type_vocab_size", 0) or 0) > 1
    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())  # a copy to configure
    backend.enable_truncation(pad_to or max_length)
    if pad_to:
        backend.enable_padding(length=pad_to, pad_id=tok.pad_token_id or 0, pad_token=tok.pad_token or "[PAD]")
    else:
        backend.no_padding()

    def run(batch: list[str]) -> list[int]:
        encs = [backend.encode(batch[0])] if len(batch) == 1 else backend.encode_batch(batch)
        if len(encs) > 1 and not pad_to:  # several texts: pad to the longest
            width = max(len(e.ids) for e in encs)
            for e in encs:
                e.pad(width, pad_id=tok.pad_token_id or 0)
        x = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64)}
        if types:
            x["token_type_ids"] = np.array([e.type_ids for e in encs], dtype=np.int64)
        return [int(i) for i in np.asarray(predict(x)).argmax(-1)]

    return run, predict


def folder_label_map(folder: str, names: list[str]) -> list[int] | None:
    """Map a folder's label ids to the train file's label order (None: same order)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()}
    own = [id2label.get(i, str(i)) for i in range(len(id2label) or len(names))]
    if own == names or all(n == f"LABEL_{i}" for i, n in enumerate(own)):
        return None
    return [names.index(n) for n in own]


def slimtune_folders(paths: list[str]) -> dict[str, str]:
    """``{row name: folder}``: model folders as given, compress outputs expanded to their candidates."""
    out: dict[str, str] = {}
    for p in map(Path, paths):
        if (p / "candidates.json").is_file():
            for c in json.loads((p / "candidates.json").read_text()):
                if c.get("status") == "ok" and c.get("name") != "input":
                    out[f"slimtune:{c['name']}"] = c["path"]
        elif (p / "config.json").is_file():
            out[f"slimtune:{p.name}"] = str(p)
        else:
            say(f"--slimtune {p}: neither a model folder nor a compress output; skipped")
    return out


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def interleaved(runners: dict[str, TextPredict], texts: list[str], threads: int, passes: int,
                seed: int = 0) -> dict[str, Any]:
    """Per-text latency (bs 1) of every runner, interleaved: round r gives every model text r,
    in a fresh random order each round.

    Not :func:`slimtune.benchmark.timing.measure_latency`'s rotation: rotating a fixed list keeps
    each model's predecessor fixed, so a 50-us static model that always runs right after a 40-ms
    transformer always meets cold caches (measured here: the same table 2x slower behind an
    ONNX model than behind its twin). A random order spreads that over every model alike.
    """
    set_threads(threads)
    names = list(runners)
    for name in names:  # warm-up on the first texts
        for t in texts[:3]:
            runners[name]([t])
    rng = random.Random(seed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(len(texts) * passes):
        batch = [texts[r % len(texts)]]
        rng.shuffle(names)
        for n in names:
            t0 = time.perf_counter()
            runners[n](batch)
            times[n].append((time.perf_counter() - t0) * 1000)
    out = {}
    for n, ts in times.items():
        srt = sorted(ts)
        out[n] = {"p50_ms": statistics.median(ts), "p95_ms": srt[min(len(ts) - 1, int(0.95 * len(ts)))],
                  "mean_ms": statistics.fmean(ts), "min_ms": srt[0], "n": len(ts)}
    return out


def dominance(rows: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """For each peer: the slimtune rows at most as slow (real lengths, p50), as large, and at least as accurate."""
    out: dict[str, list[str]] = {}
    ours = {n: r for n, r in rows.items() if r["family"] == "slimtune" and r.get("accuracy") is not None}
    for n, r in rows.items():
        if r["family"] != "peer" or r.get("accuracy") is None:
            continue
        out[n] = [m for m, c in ours.items()
                  if c["latency_real"]["p50_ms"] <= r["latency_real"]["p50_ms"] and c["size_mb"] <= r["size_mb"]
                  and c["accuracy"] >= r["accuracy"]]
    return out


def markdown(rows: dict[str, dict[str, Any]], teacher: str | None) -> str:
    ref = rows.get(teacher or "")
    lines = ["| model | family | size MB | acc | retention | p50 ms (real) | mean ms (real) | p95 ms (real) | "
             "p50 ms (pad 128) | train s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in sorted(rows.items(), key=lambda kv: kv[1]["latency_real"]["p50_ms"]):
        pad = r.get("latency_pad128")
        pad_ms = f"{pad['p50_ms']:.3f}" if pad else "-"
        ret = f"{r['accuracy'] / ref['accuracy']:.1%}" if ref else "-"
        lines.append(f"| {n} | {r['family']} | {r['size_mb']:.3f} | {r['accuracy']:.4f} | {ret} | "
                     f"{r['latency_real']['p50_ms']:.3f} | {r['latency_real']['mean_ms']:.3f} | "
                     f"{r['latency_real']['p95_ms']:.3f} | {pad_ms} | "
                     f"{r.get('train_seconds', '-')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def build_text_peers(args: argparse.Namespace, texts: list[str], labels: list[int], work: Path,
                     skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The text-in peers (TF-IDF, model2vec, fastText); a failure skips that peer with its reason."""
    want = set(args.peers)
    builders: list[tuple[str, Callable[[], list[tuple[str, dict[str, Any]]]]]] = [
        ("tfidf-logreg", lambda: [("tfidf-logreg", tfidf_peer(texts, labels, work, args.train_threads))]),
        ("model2vec", lambda: [("model2vec", model2vec_peer(texts, labels, work, args.base, args.seed))]),
        ("fasttext", lambda: fasttext_peers(texts, labels, work, args.train_threads, args.seed,
                                            "fasttext-ftz" in want)),
    ]
    rows: dict[str, dict[str, Any]] = {}
    for name, build in builders:
        if name not in want:
            continue
        say(f"building {name}")
        try:
            for n, r in build():
                rows[n] = {"family": "peer", "kind": "text", **r}
                say(f"{n}: {r['size_mb']:.2f} MB, trained in {r['train_seconds']} s")
        except Exception as e:  # a peer that cannot run is reported, never fatal
            skipped[name] = f"{type(e).__name__}: {e}"
            say(f"{name}: SKIPPED ({skipped[name]})")
    return rows


def build_token_rows(args: argparse.Namespace, work: Path, skipped: dict[str, str]) -> dict[str, str]:
    """``{row name: folder}`` of the token-id models: teacher, its ORT int8, the slimtune folders."""
    folders: dict[str, str] = {}
    if args.teacher:
        folders["teacher"] = args.teacher
        if "ort-int8" in args.peers:
            say("building ort-int8 (ONNX export + fusion + dynamic int8 of the teacher)")
            try:
                folders["ort-int8"] = str(ort_int8_folder(args.teacher, work))
            except Exception as e:  # a peer that cannot run is reported, never fatal
                skipped["ort-int8"] = f"{type(e).__name__}: {e}"
                say(f"ort-int8: SKIPPED ({skipped['ort-int8']})")
    elif "ort-int8" in args.peers:
        skipped["ort-int8"] = "no --teacher given"
    folders.update(slimtune_folders(args.slimtune))
    return folders


def score(rows: dict[str, dict[str, Any]], folders: dict[str, str], test: Any, names: list[str],
          max_length: int) -> None:
    """Accuracy and macro-F1 of every row on every test row."""
    for n, r in rows.items():
        if n in folders:
            ev = evaluate_model_dir(folders[n], test.path, max_length=max_length)
        else:
            pred = []
            for i in range(0, len(test.texts), 256):
                pred.extend(r["predict"](test.texts[i:i + 256]))
            ev = classification_metrics(pred, test.labels, names)
        r["accuracy"], r["macro_f1"] = ev["accuracy"], ev["macro_f1"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="labelled training file (or packaged:NAME/train)")
    ap.add_argument("--test", required=True, help="labelled test file (or packaged:NAME/test)")
    ap.add_argument("--teacher", help="the fine-tuned classifier folder (reference row and ORT int8 peer)")
    ap.add_argument("--slimtune", action="append", default=[], metavar="DIR",
                    help="slimtune model folder or compress output (repeatable)")
    ap.add_argument("--base", default=None, help="base encoder model2vec distils (default: the packaged minilm)")
    ap.add_argument("--peers", default="tfidf-logreg,model2vec,fasttext,fasttext-ftz,ort-int8",
                    help="comma-separated peers to build")
    ap.add_argument("--max-train-samples", type=int, default=None, help="seeded sample of the training rows")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per text for the token-id models")
    ap.add_argument("--pad-to", type=int, default=128, help="the padded latency setting (tokens)")
    ap.add_argument("--latency-texts", type=int, default=300, help="test texts timed (a seeded sample)")
    ap.add_argument("--passes", type=int, default=1, help="timed passes over those texts")
    ap.add_argument("--threads", type=int, default=1, help="threads for every latency number")
    ap.add_argument("--train-threads", type=int, default=2, help="threads for training the peers")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--work", help="folder for the peers' files (default: a temporary folder)")
    ap.add_argument("--out", help="write the results JSON here (e.g. bench/results/peers_NAME.json)")
    args = ap.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    args.base = args.base or resolve("minilm")
    return args


def main(argv: list[str] | None = None) -> int:
    """Long because it is the script: build the peers, score, time side by side, report."""
    args = parse(argv)
    train_path, test_path = expand(args.train, "--train"), expand(args.test, "--test")
    train = load_classification(train_path, max_rows=args.max_train_samples, seed=args.seed)
    test = load_classification(test_path, label_names=train.label_names)
    names = train.label_names
    work = Path(args.work or tempfile.mkdtemp(prefix="peers-"))
    work.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = build_text_peers(args, train.texts, train.labels, work, skipped)
        folders = build_token_rows(args, work, skipped)
    for n, f in folders.items():
        fam = "teacher" if n == "teacher" else "slimtune" if n.startswith("slimtune:") else "peer"
        rows[n] = {"family": fam, "kind": model_kind(f), "path": f, "size_mb": weights_size_mb(f),
                   "params": count_stored_params(f)}
        if folder_label_map(f, names) is not None:
            raise SystemExit(f"{f}: its labels {json.loads((Path(f) / 'config.json').read_text())['id2label']} "
                             f"are not the train file's {names} in order")
    say(f"scoring {len(rows)} models on {len(test)} test rows")
    score(rows, folders, test, names, args.max_length)

    sample = random.Random(args.seed).sample(test.texts, min(args.latency_texts, len(test.texts)))
    real = {n: r["predict"] for n, r in rows.items() if n not in folders}
    pad: dict[str, TextPredict] = {}
    for n, f in folders.items():
        real[n] = token_runner(f, args.threads, args.max_length)[0]
        pad[n] = token_runner(f, args.threads, args.max_length, pad_to=args.pad_to)[0]
    say(f"timing {len(real)} models on {len(sample)} test texts as they come (bs 1, {args.threads} thread(s))")
    lat_real = interleaved(real, sample, args.threads, args.passes, args.seed)
    say(f"timing {len(pad)} token-id models padded to {args.pad_to} tokens")
    lat_pad = interleaved(pad, sample, args.threads, args.passes, args.seed)
    for n, r in rows.items():
        r.pop("predict", None)
        r["latency_real"] = lat_real[n]
        r["latency_pad128"] = lat_pad.get(n)

    tok = load_tokenizer(args.teacher or args.base)
    n_tok = [len(tok(t, truncation=True, max_length=args.max_length)["input_ids"]) for t in sample]
    dom = dominance(rows)
    result = {"train": train_path, "test": test_path, "train_rows": len(train), "test_rows": len(test),
              "labels": names, "latency_texts": len(sample), "passes": args.passes,
              "tokens_per_text": {"mean": float(np.mean(n_tok)), "p50": float(np.median(n_tok)),
                                  "max": int(max(n_tok))},
              "latency_setting": f"end to end (tokenizer/vectorizer included), batch 1, {args.threads} thread(s), "
                                 "interleaved; real = the test texts as they come, pad128 = padded to "
                                 f"{args.pad_to} tokens",
              "rows": rows, "skipped": skipped, "dominated_by_slimtune": dom, "hardware": hardware_fingerprint(),
              "command": " ".join(sys.argv)}
    print(markdown(rows, "teacher" if args.teacher else None))
    print(f"\nmean tokens per timed text: {result['tokens_per_text']['mean']:.1f}")
    for peer, who in dom.items():
        print(f"- {peer}: " + (f"dominated by {', '.join(who)}" if who else "NOT dominated by any slimtune candidate"))
    for peer, why in skipped.items():
        print(f"- {peer}: skipped ({why})")
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
