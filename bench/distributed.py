"""Data-parallel fine-tuning: 1 process x T threads vs N processes x T/N threads, side by side.

Same recipe (packaged MiniLM, SST-2 subsample, global batch, epochs, LR, seed) run by
``slimtune finetune`` once in one process and once with ``--nproc N`` (torch.distributed.run,
gloo on CPU, DDP; optionally FSDP too). The machine's cores are split evenly, so the comparison
is the same hardware used two ways. Reported: training samples/s (loop only; rank 0's clock,
global samples), end-to-end wall time (process start to report: launch, imports, evaluation),
accuracy on sst2/test.tsv (872 rows) and the largest weight difference between the runs
(dropout draws differ per rank, so the runs are close, not identical).

Run under the shared CPU lock:

    flock /tmp/slimtune-heavy.lock python bench/distributed.py --rows 8000 --epochs 1 --seeds 42 43 44 [--fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"


def run(a: dict, out: Path, nproc: int, threads: int, extra: list[str]) -> dict:
    """One ``slimtune finetune`` run; its metrics, wall time and the command."""
    cmd = [sys.executable, "-m", "slimtune.cli.main", "finetune", "--model", "minilm", "--train", str(DATA / "train.tsv"),
           "--eval", str(DATA / "test.tsv"), "--output", str(out), "--max-train-samples", str(a["rows"]),
           "--epochs", str(a["epochs"]), "--batch-size", str(a["batch_size"]), "--lr", str(a["lr"]),
           "--max-length", str(a["max_length"]), "--seed", str(a["seed"]),
           *(["--nproc", str(nproc)] if nproc > 1 else []),
           "train.tensorboard=false", f"train.num_threads={threads}", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"nproc": nproc, "threads_per_proc": threads, "samples_per_s": m["train"]["samples_per_s"],
            "train_seconds": m["train"]["train_seconds"], "wall_seconds": wall, "accuracy": m["accuracy"],
            "steps": m["train"]["steps"], "samples": m["train"]["samples"],
            "peak_rss_mb_rank0": m["train"]["peak_rss_mb"], "grad_sync_mb": m["train"].get("grad_sync_mb"),
            "command": " ".join(cmd[2:])}


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[42],
                   help="one pair of runs per seed; accuracy is compared on the mean over seeds, next to the "
                        "seed-to-seed spread (dropout draws differ per rank, so one pair alone is noise-bound)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads in all (split over processes)")
    p.add_argument("--fsdp", action="store_true", help="also run N processes with train.fsdp=true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed.json"))
    args = p.parse_args()
    per = max(1, args.threads // args.nproc)
    configs = {"1 process": (1, args.threads, []), f"{args.nproc} processes (DDP)": (args.nproc, per, [])}
    if args.fsdp:
        configs[f"{args.nproc} processes (FSDP)"] = (args.nproc, per, ["train.fsdp=true"])
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    diffs: dict[str, list[float]] = {k: [] for k in configs if k != "1 process"}
    for seed in args.seeds:
        a = {**vars(args), "seed": seed}
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, (nproc, threads, extra)) in enumerate(configs.items()):
                runs[name].append(run(a, Path(tmp, str(i)), nproc, threads, extra))
                if i:
                    diffs[name].append(max_weight_diff(Path(tmp, "0"), Path(tmp, str(i))))
        print(f"[bench] seed {seed}: " + ", ".join(f"{k} {v[-1]['accuracy']:.4f}" for k, v in runs.items()),
              file=sys.stderr, flush=True)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def std(xs: list[float]) -> float:
        return (sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else float("nan")

    base = runs["1 process"]
    print(f"MiniLM full fine-tune on {args.rows} SST-2 rows, global batch {args.batch_size}, {args.epochs:g} epoch(s), "
          f"{os.cpu_count()} cores, {args.threads} threads in all, seeds {args.seeds}; accuracy on sst2/test.tsv "
          f"(872 rows), mean over seeds\n")
    print("| run | procs x threads | samples/s | vs 1 proc | train s | wall s (end to end) | accuracy (mean ± sd) "
          "| per seed | Δ acc vs 1 proc (pt) |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for name, rs in runs.items():
        acc = [r["accuracy"] for r in rs]
        sps = mean([r["samples_per_s"] for r in rs])
        summary[name] = {"accuracy_mean": mean(acc), "accuracy_sd": std(acc), "samples_per_s_mean": sps,
                         "delta_pt": 100 * (mean(acc) - mean([r["accuracy"] for r in base]))}
        print(f"| {name} | {rs[0]['nproc']} x {rs[0]['threads_per_proc']} | {sps:.1f} | "
              f"{sps / mean([r['samples_per_s'] for r in base]):.2f}x | {mean([r['train_seconds'] for r in rs]):.1f} | "
              f"{mean([r['wall_seconds'] for r in rs]):.1f} | {mean(acc):.4f} ± {100 * std(acc):.2f} pt | "
              f"{' '.join(f'{x:.4f}' for x in acc)} | {summary[name]['delta_pt']:+.2f} |")
    print("\nmax |weight difference| vs 1 process: " +
          ", ".join(f"{k} {max(v):.2e}" for k, v in diffs.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary, "max_weight_diff": diffs,
                                          "settings": vars(args), "cores": os.cpu_count()}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
