"""slimtune's compressed model against what practitioners use out of the box, side by side in ONE run.

Rows (all on the same fine-tuned classifier, the *teacher*):

- ``fp32 (torch)``: the fine-tune as transformers runs it;
- ``torch dynamic int8``: ``torch.ao.quantization.quantize_dynamic`` with its defaults
  (per-tensor int8 Linear weights, fp32 embeddings; size = ``torch.save(state_dict)`` bytes);
- ``ONNX Runtime int8``: plain ONNX export + ``onnxruntime.quantization.quantize_dynamic``
  (its defaults: per-tensor, MatMul and Gather, so embeddings too; no graph fusion);
- one row per ``--model`` folder given (e.g. ``slimtune compress``'s ``OUT/best``), run through
  the runtime it ships for (:func:`slimtune.benchmark.latency.load_predict`).

Latency: bs 1, seq 128 (padded), 1 thread by default, all rows interleaved round by round
(:func:`slimtune.benchmark.latency.measure_latency`), each model fed the same sentence tokenized by its own
tokenizer (a vocabulary-pruned model has its own ids). Accuracy: ``--eval`` (default
``sst2/test.tsv``), each model with its own tokenizer. Ratios are against ``fp32 (torch)``.

Usage (nothing else running)::

    flock /tmp/slimtune-heavy.lock python bench/vs_baselines.py --model OUT/best
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from slimtune.runtime.predict import torch_predict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SLIMTUNE_NO_PROGRESS", "1")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="/work/artifacts/minilm-sst2", help="the fine-tuned fp32 classifier")
    ap.add_argument("--model", action="append", default=[], metavar="DIR",
                    help="slimtune output folder(s) to compare (repeatable)")
    ap.add_argument("--eval", default=str(DATA / "sst2" / "test.tsv"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=100, help="interleaved rounds")
    ap.add_argument("--out", help="write the results JSON here")
    args = ap.parse_args(argv)

    import torch

    from slimtune.benchmark.timing import (
        hardware_fingerprint,
        measure_latency,
        sample_inputs,
        set_threads,
    )
    from slimtune.compress.quant import backends as B
    from slimtune.evaluate.evaluator import evaluate_model_dir
    from slimtune.io import weights_size_mb
    from slimtune.models.loading import load_model
    from slimtune.runtime.classifier import load_predict

    set_threads(args.threads)
    teacher = Path(args.teacher)
    predict32, tok = load_predict(teacher)
    model = load_model(str(teacher), "classification").eval()  # for the baselines to quantize

    rows: dict[str, dict[str, Any]] = {}
    preds: dict[str, tuple[Any, Any]] = {}  # name -> (predict, tokenizer)
    rows["fp32 (torch)"] = {"size_mb": weights_size_mb(teacher), "path": str(teacher)}
    preds["fp32 (torch)"] = (predict32, tok)

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qd = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    buf = io.BytesIO()
    torch.save(qd.state_dict(), buf)
    rows["torch dynamic int8"] = {"size_mb": len(buf.getvalue()) / 1e6,
                                  "note": "torch.save(state_dict) bytes, in memory (a pickle: never written)"}
    preds["torch dynamic int8"] = (torch_predict(qd), tok)

    work = Path(tempfile.mkdtemp(prefix="slimtune-vs-"))
    ort = B.build_onnxruntime(model, work, tok, fused=False, per_channel=False, quantize_embeddings=True,
                              name="ort-int8")
    rows["ONNX Runtime int8"] = {"size_mb": weights_size_mb(ort.path),
                                 "note": "quantize_dynamic defaults: per-tensor, MatMul + Gather (embeddings), no fusion"}
    preds["ONNX Runtime int8"] = (ort.predict, tok)

    for d in args.model:
        p, t = load_predict(d)
        name = f"slimtune: {Path(d).resolve().parent.name}/{Path(d).name}"
        meta = Path(d) / "metrics.json"
        rows[name] = {"size_mb": weights_size_mb(d), "path": str(d),
                      "settings": json.loads(meta.read_text()).get("settings") if meta.is_file() else None}
        preds[name] = (p, t)

    print(f"[bench] accuracy on {args.eval}", file=sys.stderr)
    for name, (p, t) in preds.items():
        r = evaluate_model_dir(rows[name].get("path", str(teacher)), args.eval, predict=p, tokenizer=t,
                               max_length=args.seq_len)
        rows[name].update(accuracy=r["accuracy"], macro_f1=r["macro_f1"])

    print(f"[bench] latency: bs {args.batch_size}, seq {args.seq_len}, {args.threads} thread(s), "
          f"{args.repeats} interleaved rounds", file=sys.stderr)
    inputs = {n: sample_inputs(t, args.batch_size, args.seq_len) for n, (_, t) in preds.items()}
    lat = measure_latency({n: (lambda p=p, x=inputs[n]: p(x)) for n, (p, _) in preds.items()},
                          repeats=args.repeats, warmup=5)
    ref = rows["fp32 (torch)"]
    for n, r in rows.items():
        r.update(p50_ms=lat[n]["p50_ms"], p95_ms=lat[n]["p95_ms"])
    for r in rows.values():
        r.update(x_smaller=ref["size_mb"] / r["size_mb"], x_faster=ref["p50_ms"] / r["p50_ms"],
                 delta_pt=100 * (r["accuracy"] - ref["accuracy"]), retention=r["accuracy"] / ref["accuracy"])

    lines = ["| model | size MB | x smaller | p50 ms | p95 ms | x faster | accuracy | Δ pt | retention |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['size_mb']:.2f} | {r['x_smaller']:.2f}x | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['x_faster']:.2f}x | {r['accuracy']:.4f} | {r['delta_pt']:+.2f} | {r['retention']:.2%} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "eval": args.eval, "threads": args.threads,
                                              "batch_size": args.batch_size, "seq_len": args.seq_len,
                                              "repeats": args.repeats, "hardware": hardware_fingerprint(),
                                              "table": table}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
