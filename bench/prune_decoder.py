"""Decoder pruning benchmark: depth, width and vocabulary pruning of a tuned SmolLM2, each after a short recovery.

Every variant is made by the real command line (``slimtune prune``, recorded verbatim), then
evaluated by ``slimtune evaluate`` on the same seeded sample of the test file as the unpruned
model: exact match, label accuracy, answer perplexity, parameters and MB on disk, side by side.

    nice python bench/prune_decoder.py --model /work/assets/smollm2_rt/model \\
        --data /work/assets/rt_instruct --out /tmp/prune-decoder --test-samples 200 --recover-steps 40

Writes ``bench/results/prune_decoder.json`` (``--results``) after every variant, so an
interrupted run keeps what it measured; ``--reuse`` skips variants whose folders are complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# name -> (label, prune flags); "{R}" = the recovery flags; variants are built in this order.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "vocab": ("vocabulary of train+dev (exact, no training)", ["--vocab"]),
    "d24": ("depth 30 -> 24 (block influence) + recovery", ["--keep-layers", "24", "{R}"]),
    "d20": ("depth 30 -> 20 (block influence) + recovery", ["--keep-layers", "20", "{R}"]),
    "d24_w": ("depth 24 + FFN -25% + recovery", ["--keep-layers", "24", "--ffn", "0.25", "{R}"]),
    "d24_w_v": ("depth 24 + FFN -25% + vocabulary + recovery", ["--keep-layers", "24", "--ffn", "0.25", "--vocab", "{R}"]),
    "d20_w_v": ("depth 20 + FFN -25% + vocabulary + recovery", ["--keep-layers", "20", "--ffn", "0.25", "--vocab", "{R}"]),
    "d24_h_v": ("depth 24 + 1 of 3 KV groups + vocabulary + recovery", ["--keep-layers", "24", "--heads", "0.34", "--vocab", "{R}"]),
    # the same recipes with a 3x longer recovery (a later --recover-steps wins)
    "d24_v_long": ("depth 24 + vocabulary + 120-step recovery", ["--keep-layers", "24", "--vocab", "{R}", "--recover-steps", "120"]),
    "d20_v_long": ("depth 20 + vocabulary + 120-step recovery", ["--keep-layers", "20", "--vocab", "{R}", "--recover-steps", "120"]),
}


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (output appended to ``log``); return its wall seconds; exit on failure."""
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if rc != 0:
        sys.exit(f"failed ({rc}): {shlex.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def evaluate(args: argparse.Namespace, model: str, out: Path, log: Path) -> tuple[dict[str, Any], list[str], float]:
    """Test metrics of ``model`` on the seeded test sample (cached in ``out``)."""
    cmd = ["slimtune", "evaluate", "--model", model, "--eval", str(args.data / "test.jsonl"),
           "--max-eval-samples", str(args.test_samples), "--max-length", "160", "--output", str(out)]
    seconds = 0.0
    if not (args.reuse and out.is_file()):
        seconds = run(cmd, log)
    m = json.loads(out.read_text())
    keys = ("exact_match", "accuracy", "macro_f1", "no_label", "answer_perplexity", "n", "params", "size_mb",
            "generated_tokens", "generate_seconds")
    return {k: m.get(k) for k in keys}, cmd, seconds


def build(args: argparse.Namespace, name: str, flags: list[str], log: Path) -> tuple[Path, list[str], float]:
    out = args.out / name
    recover = ["--recover-steps", str(args.recover_steps), "--kd", "--lr", str(args.lr),
               "--kd-positions", args.kd_positions, "--batch-size", str(args.batch_size)]
    flags = [x for f in flags for x in (recover if f == "{R}" else [f])]
    cmd = ["slimtune", "prune", "--model", args.model, "--train", str(args.data / "train.jsonl"),
           "--eval", str(args.data / "dev.jsonl"), *flags, "--num-threads", "1", "--seed", "0",
           "--output", str(out), "--overwrite"]
    seconds = 0.0
    if not (args.reuse and (out / "metrics.json").is_file()):
        seconds = run(cmd, log)
    return out, cmd, seconds


def speed(folders: dict[str, str], prompt: list[dict[str, str]], rounds: int, new_tokens: int) -> dict[str, Any]:
    """Greedy decoding at batch 1 on 1 thread, models interleaved round by round (fair under shared load).

    Returns per model the median prompt tokens/s (one forward over the prompt) and decode tokens/s
    (``new_tokens`` forced tokens through ``generate`` with the KV cache, prompt time subtracted).
    """
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.runtime.generate import prompt_ids

    torch.set_num_threads(1)
    loaded = {}
    for name, path in folders.items():
        tok = AutoTokenizer.from_pretrained(path)
        ids = torch.tensor([prompt_ids(tok, prompt)])
        loaded[name] = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), ids)
    times: dict[str, dict[str, list[float]]] = {n: {"prompt": [], "decode": []} for n in folders}
    with torch.inference_mode():
        for r in range(rounds + 1):  # round 0 warms up
            for name, (model, ids) in loaded.items():
                t0 = time.perf_counter()
                model(input_ids=ids)
                t1 = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
                t2 = time.perf_counter()
                if r:
                    times[name]["prompt"].append(t1 - t0)
                    times[name]["decode"].append(max(1e-9, (t2 - t1) - (t1 - t0)))
    out = {}
    for name, (_model, ids) in loaded.items():
        p, d = statistics.median(times[name]["prompt"]), statistics.median(times[name]["decode"])
        out[name] = {"prompt_tokens": ids.shape[1], "prompt_tokens_per_s": ids.shape[1] / p,
                     "decode_tokens_per_s": new_tokens / d}
    base = out[next(iter(out))]
    for v in out.values():
        v["decode_speedup"] = v["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        v["prompt_speedup"] = v["prompt_tokens_per_s"] / base["prompt_tokens_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the tuned (merged) causal LM folder")
    p.add_argument("--data", type=Path, required=True, help="folder with train/dev/test.jsonl")
    p.add_argument("--out", type=Path, required=True, help="where the pruned folders go")
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if not v.endswith("_long")], choices=list(VARIANTS))
    p.add_argument("--test-samples", type=int, default=200)
    p.add_argument("--recover-steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--kd-positions", default="answer", choices=["answer", "all"])
    p.add_argument("--speed-rounds", type=int, default=3, help="interleaved decode-speed rounds (0: skip)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reuse", action="store_true", help="keep variants (and evaluations) already written")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "prune_decoder.json")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "bench.log"
    results: dict[str, Any] = {
        "what": "slimtune prune of a tuned causal LM (depth/width/vocabulary + KD recovery) vs the unpruned model, "
                "test exact match / accuracy / answer perplexity on one seeded test sample, params, MB",
        "machine": "2 shared CPU cores (other agents' jobs running), 1 torch thread, fp32",
        "model": args.model, "data": str(args.data), "test_samples": args.test_samples,
        "recovery": {"steps": args.recover_steps, "lr": args.lr, "batch_size": args.batch_size, "kd": True,
                     "kd_positions": args.kd_positions},
        "variants": {},
    }
    m, cmd, secs = evaluate(args, args.model, args.out / "unpruned_test.json", log)
    results["variants"]["unpruned"] = {"label": "tuned model, unpruned", "test": m, "evaluate_command": shlex.join(cmd),
                                       "evaluate_seconds": secs}
    args.results.write_text(json.dumps(results, indent=1))
    for name in args.variants:
        label, flags = VARIANTS[name]
        out, pcmd, psecs = build(args, name, flags, log)
        pm = json.loads((out / "metrics.json").read_text())
        tm, ecmd, esecs = evaluate(args, str(out), out / "test_metrics.json", log)
        base = results["variants"]["unpruned"]["test"]
        results["variants"][name] = {
            "label": label, "prune_command": shlex.join(pcmd), "prune_seconds": psecs or pm.get("seconds"),
            "evaluate_command": shlex.join(ecmd), "test": tm,
            "dev": {k: pm.get(k) for k in ("exact_match", "accuracy", "answer_perplexity", "n")},
            "architecture": pm["architecture"], "params": pm["params"], "size_mb": pm["size_mb"],
            "params_ratio": base["params"] / pm["params"] if base.get("params") else None,
            "size_ratio": base["size_mb"] / pm["size_mb"] if base.get("size_mb") else None,
            "exact_match_delta_pt": 100 * (tm["exact_match"] - base["exact_match"]),
            "depth": {k: pm["depth"][k] for k in ("dropped_layers", "block_influence")} if "depth" in pm else None,
            "vocab": pm.get("vocab"), "train": pm.get("train"),
        }
        args.results.write_text(json.dumps(results, indent=1))
        print(f"{name:10s} EM {tm['exact_match']:.3f} acc {tm['accuracy']:.3f} ppl {tm['answer_perplexity']:.3f} "
              f"params {pm['params']:,} MB {pm['size_mb']:.1f}", flush=True)
    if args.speed_rounds:
        from slimtune.data.chat import load_chat

        prompt = load_chat(args.data / "test.jsonl").conversations[0].messages[:-1]
        folders = {"unpruned": args.model, **{n: str(args.out / n) for n in args.variants}}
        results["speed"] = {"setting": f"bs 1, 1 thread, greedy, {args.new_tokens} forced new tokens, transformers fp32, "
                                       f"median of {args.speed_rounds} interleaved rounds, first test prompt",
                            "models": speed(folders, prompt, args.speed_rounds, args.new_tokens)}
        args.results.write_text(json.dumps(results, indent=1))
        for name, v in results["speed"]["models"].items():
            print(f"{name:10s} prompt {v['prompt_tokens_per_s']:.0f} tok/s, decode {v['decode_tokens_per_s']:.1f} tok/s "
                  f"({v['decode_speedup']:.2f}x)", flush=True)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
