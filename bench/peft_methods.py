"""Every fine-tuning method on the packaged MiniLM and SST-2, same data, steps and seed.

Each method runs as its own ``slimtune finetune`` process (so peak RSS is per method) under
the shared heavy-run lock, then this script collects from each run folder: accuracy on
``sst2/test.tsv``, trainable parameters, peak RSS, wall time, and the bytes that must be stored
(the PEFT adapter, the bottleneck-adapter folder, the shared model; the whole model for full
fine-tuning). It prints a Markdown table, AdaLoRA's final per-layer ranks and the sharing
comparison, and writes everything to ``OUT/peft_methods.json``.

    python bench/peft_methods.py --out DIR          # takes the lock around each run
    flock /tmp/slimtune-heavy.lock python bench/peft_methods.py --out DIR --lock ''   # one hold
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# (label, method, learning rate, extra recipe overrides). LRs are the usual ones per family:
# full-weight training ~1e-4 for a small encoder, low-rank adapters ~1e-3, IA3 vectors higher.
RUNS: list[tuple[str, str, float, list[str]]] = [
    ("full", "full", 1e-4, []),
    ("lora r16", "lora", 1e-3, []),
    # AdaLoRA starts with E = 0 and P, Q ~ N(0, 0.02): its update grows from a product of three
    # small factors, so at 1e-3 it barely moves in 125 steps (0.51 with the orthogonality term,
    # 0.78 without, measured); 5e-3 is its working rate here (0.82 with the term, 0.82 without).
    ("adalora 12->8", "adalora", 5e-3, ["method.init_r=12", "method.target_r=8"]),
    ("adalora 12->8 orth0", "adalora", 5e-3, ["method.init_r=12", "method.target_r=8", "method.orth_reg_weight=0"]),
    ("ia3", "ia3", 5e-3, []),
    ("adapters 64 both", "adapters", 1e-3, ["method.size=64", "method.placement=both"]),
    ("sharing 6->3", "sharing", 1e-4, ["method.groups=3", "method.init=mean"]),
    ("sharing 6->3 + emb r192", "sharing", 1e-4, ["method.groups=3", "method.init=mean", "method.embedding_rank=192"]),
    ("sharing 6->3 + emb r192 + relax r32", "sharing", 1e-4, ["method.groups=3", "method.init=mean", "method.embedding_rank=192", "method.share=matrices", "method.relax_rank=32"]),
    ("sharing 6->3 + emb r192 + relax r32 lr3e-4", "sharing", 3e-4, ["method.groups=3", "method.init=mean", "method.embedding_rank=192", "method.share=matrices", "method.relax_rank=32"]),
]

# What must be stored to serve each method (relative to the run folder).
STORED = {"full": ["model.safetensors"], "lora": ["adapter/adapter_model.safetensors"],
          "adalora": ["adapter/adapter_model.safetensors"], "ia3": ["adapter/adapter_model.safetensors"],
          "adapters": ["adapters/adapter_model.safetensors"], "sharing": ["model_shared.safetensors"]}


def run_one(label: str, method: str, lr: float, extra: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run one fine-tune in a subprocess (holding the heavy-run lock); return its metrics."""
    out = Path(args.out) / label.replace(" ", "_").replace(">", "").replace("+", "")
    cmd = ["slimtune", "finetune", "--model", args.model, "--train", args.train, "--eval", args.eval,
           "--output", str(out), "--method", method, "--max-train-samples", str(args.train_rows),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(lr),
           "--seed", str(args.seed), "train.tensorboard=false", "train.resume=false", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"}
    with open(args.lock or os.devnull, "a") as lock:
        if args.lock:  # same lock as `flock /tmp/slimtune-heavy.lock ...`
            fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: `{' '.join(cmd)}` failed:\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    stored = sum((out / f).stat().st_size for f in STORED[method])
    row = {"label": label, "method": method, "lr": lr, "overrides": extra, "dir": str(out),
           "accuracy": m["accuracy"], "trainable_params": m["trainable_params"], "params": m["params"],
           "peak_rss_mb": m["peak_rss_mb"], "wall_s": wall, "train_s": m["train"]["train_seconds"],
           "steps": m["train"]["steps"], "stored_bytes": stored, "command": " ".join(cmd)}
    if method == "adalora":
        row["adalora_ranks"] = json.loads((out / "adalora_ranks.json").read_text())
    print(f"[bench] {label}: acc {row['accuracy']:.4f}, {wall:.0f} s", file=sys.stderr)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown results table (sizes relative to the full fine-tune's model.safetensors)."""
    ref = next((r for r in rows if r["method"] == "full"), None)
    lines = ["| method | test acc | Δ acc vs full (pt) | trainable params | stored MB | stored / full | peak RSS MB | wall s | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d_acc = f"{100 * (r['accuracy'] - ref['accuracy']):+.2f}" if ref else "-"
        ratio = f"{r['stored_bytes'] / ref['stored_bytes']:.1%}" if ref else "-"
        lines.append(f"| {r['label']} | {r['accuracy']:.4f} | {d_acc} | {r['trainable_params']:,} | "
                     f"{r['stored_bytes'] / 1e6:.2f} | {ratio} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def rank_table(ranks: dict[str, Any]) -> str:
    """AdaLoRA's final rank per layer and module (rows: blocks, columns: module)."""
    from slimtune.methods.adalora import _by_layer

    rows = _by_layer(ranks["layers"])
    cols = list(next(iter(rows.values())))
    lines = ["| block | " + " | ".join(cols) + " | sum |", "|---" * (len(cols) + 2) + "|"]
    for layer, row in rows.items():
        lines.append(f"| {layer} | " + " | ".join(str(row.get(c, "-")) for c in cols) + f" | {sum(row.values())} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/work/artifacts/peft-methods")
    p.add_argument("--model", default="minilm")
    p.add_argument("--train", default="../shared/data/sst2/train.tsv")
    p.add_argument("--eval", default="../shared/data/sst2/test.tsv")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--only", nargs="*", help="run only these labels")
    p.add_argument("--lock", default="/tmp/slimtune-heavy.lock",
                   help="lock file taken around each run; '' when the caller already holds it")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    json_path = Path(args.out) / "peft_methods.json"
    rows: list[dict[str, Any]] = []
    if args.only and json_path.is_file():  # re-running some labels: keep the others' results
        rows = [r for r in json.loads(json_path.read_text())["runs"] if r["label"] not in args.only]
    for label, method, lr, extra in RUNS:
        if args.only and label not in args.only:
            continue
        rows.append(run_one(label, method, lr, extra, args))
        order = [r[0] for r in RUNS]
        rows.sort(key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))
        json_path.write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=1))  # partial results survive
    print(f"MiniLM-L6 on SST-2: {args.train_rows} training rows, {args.epochs:g} epoch(s), batch {args.batch_size}, "
          f"seed {args.seed}; accuracy on {args.eval}\n")
    print(table(rows))
    for ada in (r for r in rows if r["method"] == "adalora"):
        rk = ada["adalora_ranks"]
        print(f"\n{ada['label']}: final ranks (init {rk['init_r']}, target mean {rk['target_r']}, "
              f"total {rk['total_rank']} = budget {rk['budget']}):\n")
        print(rank_table(rk))
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        if r["method"] == "sharing" and full:
            print(f"\n{r['label']}: stored {r['stored_bytes'] / 1e6:.1f} MB = {r['stored_bytes'] / full['stored_bytes']:.1%} "
                  f"of the unshared full fine-tune ({full['stored_bytes'] / 1e6:.1f} MB); accuracy "
                  f"{100 * (r['accuracy'] - full['accuracy']):+.2f} pt. Same FLOPs per token (bytes saved, not compute; relax_rank adds two rank-r matmuls per linear).")
    print(f"\nJSON: {json_path}")


if __name__ == "__main__":
    main()
