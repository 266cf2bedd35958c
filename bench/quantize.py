"""Benchmark: every quantization scheme and int8 backend on one classifier, side by side.

For each variant: size on disk, accuracy and logits SQNR vs fp32 on the eval file, and CPU
latency p50 at (bs 1, seq 128) and (bs 8, seq 128), all variants timed interleaved in one
run per shape (slimtune.benchmark.latency.measure_latency), 1 thread by default. Baselines from the
project brief are in the same run: torch ``quantize_dynamic`` (per-tensor, fp32 embeddings)
and plain ONNX Runtime int8 (no fusion, per-tensor).

    flock /tmp/slimtune-heavy.lock python bench/quantize.py --model /work/artifacts/minilm-sst2 \\
        --eval ../shared/data/sst2/test.tsv --out /work/artifacts/quant/bench

Prints a Markdown table; writes ``OUT/bench_quantize.json``.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import time
from pathlib import Path
from typing import Any

from slimtune.runtime.predict import predict_all, torch_predict


def _torch_bytes(model: Any) -> float:
    """MB of a torch-only model's state (serialised in memory; never written or loaded)."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue()) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/work/artifacts/minilm-sst2")
    ap.add_argument("--eval", default="../shared/data/sst2/test.tsv")
    ap.add_argument("--out", default="/work/artifacts/quant/bench")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30, help="interleaved rounds at bs 1 (bs 8: a third)")
    ap.add_argument("--max-eval-samples", type=int)
    ap.add_argument("--calib", default="../shared/data/sst2/dev.tsv", help="texts for the mixed-precision search")
    ap.add_argument("--target-db", type=float, default=30.5, help="logits SQNR the mixed-precision candidate aims at")
    ap.add_argument("--skip-storage", action="store_true", help="only the int8 backends")
    args = ap.parse_args(argv)

    import torch

    from slimtune.benchmark.timing import (
        hardware_fingerprint,
        measure_latency,
        sample_inputs,
        set_threads,
    )
    from slimtune.compress.quant import backends as B
    from slimtune.compress.quant.api import (
        Int4WeightConfig,
        KMeansConfig,
        NF4Config,
        dequantize_,
        quantize_,
    )
    from slimtune.compress.quant.linear import sqnr_db
    from slimtune.compress.quant.onnx import write_onnx_folder
    from slimtune.compress.quant.recipe import _eval_setup
    from slimtune.compress.quant.storage import load_quantized, save_quantized
    from slimtune.data.datasets import TokenizedData
    from slimtune.io import atomic_write_json, weights_size_mb
    from slimtune.models.loading import label_names_of, load_model, load_tokenizer

    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.model)
    tok = load_tokenizer(str(src))
    model = load_model(str(src), "classification").eval()
    data = _eval_setup(src, args.eval, tok, label_names_of(model), args.max_eval_samples, None)

    t0 = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    fp32 = B.Candidate("fp32", "torch", torch_predict(model), src, {})
    rows["fp32"] = {"backend": "torch fp32", "size_mb": weights_size_mb(src)}
    cands = [fp32]
    onnx_fp32 = write_onnx_folder(model, out / "onnx-fp32", tok, optimize=True, quantize=False)
    cands.append(B.Candidate("onnxruntime-fp32-fused", "onnxruntime", B.onnx_predict(out / "onnx-fp32"),
                             out / "onnx-fp32", onnx_fp32))
    calib = _eval_setup(src, args.calib, tok, label_names_of(model), 256, None)
    int8, failed = B.build_candidates(model, tok, out, ["onnxruntime", "torch", "torchao"], baselines=True,
                                      calib=calib, target_db=args.target_db)
    cands += int8
    for name, why in failed.items():
        print(f"[bench] {name} failed: {why}", file=sys.stderr)
    for c in cands[1:]:
        rows[c.name] = {"backend": c.backend}
        if c.path is not None:
            rows[c.name]["size_mb"] = weights_size_mb(c.path)
    for c in int8:  # torch-only variants have no folder
        if c.path is None and c.name == "torch-quantize_dynamic":
            import warnings

            from torch.ao.quantization import quantize_dynamic

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qd = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
            rows[c.name].update(size_mb=_torch_bytes(qd), size_note="torch.save(state_dict) bytes, in memory")
    if not args.skip_storage:
        storage = {"int4-group32": Int4WeightConfig(group_size=32), "int4-group128": Int4WeightConfig(group_size=128),
                   "int4-channel": Int4WeightConfig(granularity="channel"), "nf4-block64": NF4Config(),
                   "kmeans4-channel": KMeansConfig(bits=4, granularity="channel")}
        for name, cfg in storage.items():
            q = quantize_(copy.deepcopy(model), cfg)
            save_quantized(q, out / name, cfg, tok)
            served = dequantize_(load_quantized(out / name))
            cands.append(B.Candidate(name, "torch (decoded at load)", torch_predict(served), out / name))
            rows[name] = {"backend": "torch (decoded at load)", "size_mb": weights_size_mb(out / name)}
    print(f"[bench] built {len(cands)} variants in {time.perf_counter() - t0:.0f} s; evaluating", file=sys.stderr)
    ref = predict_all(fp32.predict, data)
    acc32 = B.accuracy(ref, data.labels)
    for c in cands:
        if c.backend == "torchao":  # ~25x fp32 time: SQNR on 64 rows only, no accuracy
            sub = TokenizedData(data.input_ids[:64], data.token_type_ids[:64] if data.token_type_ids else None,
                                data.labels[:64], data.pad_id)
            rows[c.name].update(accuracy=None, sqnr_db=sqnr_db(ref[:64], predict_all(c.predict, sub)),
                                note="SQNR on the first 64 rows only (too slow for the full set)")
            continue
        lg = ref if c is fp32 else predict_all(c.predict, data)
        rows[c.name].update(accuracy=B.accuracy(lg, data.labels), sqnr_db=sqnr_db(ref, lg) if c is not fp32 else None)

    for bs, reps in ((1, args.repeats), (8, max(5, args.repeats // 3))):
        inputs = sample_inputs(tok, bs, args.seq_len)
        print(f"[bench] timing bs {bs} x {reps} rounds", file=sys.stderr)
        # torchao (eager) is ~25x slower than fp32 on CPU: timed on a short run of its own.
        slow = {c.name for c in cands if c.backend == "torchao"}
        lat = measure_latency({c.name: (lambda p=c.predict, x=inputs: p(x)) for c in cands if c.name not in slow},
                              repeats=reps, warmup=3)
        for c in cands:
            if c.name in slow:
                lat[c.name] = measure_latency({c.name: lambda p=c.predict, x=inputs: p(x)}, repeats=3, warmup=1)[c.name]
                rows[c.name][f"note_bs{bs}"] = "timed separately (3 rounds): too slow to interleave"
            rows[c.name][f"p50_bs{bs}_ms"] = lat[c.name]["p50_ms"]
            rows[c.name][f"p95_bs{bs}_ms"] = lat[c.name]["p95_ms"]

    base = rows["fp32"]
    lines = [f"MiniLM SST-2 ({src}), eval {args.eval} (n={len(data)}), seq {args.seq_len}, "
             f"{args.threads} thread(s); fp32 accuracy {acc32:.4f}", "",
             "| variant | backend | size MB | × smaller | accuracy | Δ pt | logits SQNR dB | p50 bs1 ms | × faster | p50 bs8 ms | × faster |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") else "n/a"
        smaller = f"{base['size_mb'] / r['size_mb']:.2f}" if r.get("size_mb") else "n/a"
        sq = f"{r['sqnr_db']:.1f}" if r.get("sqnr_db") is not None else "ref"
        acc = f"{r['accuracy']:.4f} | {(r['accuracy'] - acc32) * 100:+.2f}" if r.get("accuracy") is not None else "n/a | n/a"
        lines.append(f"| {name} | {r['backend']} | {size} | {smaller} | {acc} | {sq} | {r['p50_bs1_ms']:.1f} | "
                     f"{base['p50_bs1_ms'] / r['p50_bs1_ms']:.2f} | {r['p50_bs8_ms']:.1f} | "
                     f"{base['p50_bs8_ms'] / r['p50_bs8_ms']:.2f} |")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(out / "bench_quantize.json", {"rows": rows, "fp32_accuracy": acc32, "eval": args.eval,
                                                    "n": len(data), "threads": args.threads,
                                                    "seq_len": args.seq_len, "repeats": args.repeats,
                                                    "failed": failed, "hardware": hardware_fingerprint(),
                                                    "int8_info": {c.name: c.info for c in int8},
                                                    "seconds": round(time.perf_counter() - t0, 1)})
    (out / "bench_quantize.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
