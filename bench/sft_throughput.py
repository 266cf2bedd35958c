"""Chat SFT throughput and memory: ``slimtune finetune`` vs TRL ``SFTTrainer`` + PEFT, and QLoRA vs LoRA.

Side by side in ONE run of this script; every training run in its own subprocess, one after the
other, on the same cores. Same model (the ``smollm2`` alias, SmolLM2-135M-Instruct), the same
chat rows (a seeded ``steps x batch`` sample of ``--data/train.jsonl``: one epoch, every row seen
once), LoRA rank / alpha / dropout / target modules (slimtune's default list: every linear of
the transformer blocks), batch size, sequence length (``max_length``), steps, learning rate,
linear schedule with 6% warm-up, weight decay 0.01, clipping at 1.0, seed; loss on the answer
tokens only in both (TRL: conversational prompt-completion rows, ``completion_only_loss``;
slimtune: chat rows).

Runs (``--runs``, comma-separated):

- ``slimtune``: ``slimtune finetune --method lora`` (its defaults: fp32 on CPU, batches grouped by
  length, LM-head logits at the answer positions only);
- ``trl``: ``SFTTrainer`` at the same precision and memory settings (``bf16=False``,
  ``gradient_checkpointing=False``); otherwise its defaults (random batches, padded to the
  longest row of the batch, its chunked LM head);
- ``trl-labels``: as ``trl``, fed slimtune's token ids and labels (pre-tokenized ``input_ids`` +
  ``labels`` columns): the same tokens trained (TRL's own prompt-completion masking also trains
  the newline the template puts after ``<|im_end|>``, one more target a row);
- ``trl-bf16``: ``bf16=True``, ``gradient_checkpointing=False``;
- ``trl-defaults``: ``SFTConfig``'s own defaults for those two (``bf16=True`` autocast,
  ``gradient_checkpointing=True``);
- ``slimtune-shuffled``: ``data.group_by_length=false``: random batches, as TRL draws them;
- ``slimtune-bf16``: ``--precision bf16``;
- ``lora-gc``: slimtune LoRA with ``--gradient-checkpointing`` (what checkpointing alone saves);
- ``qlora``: ``--method qlora`` (NF4 base; gradient checkpointing and ``release_memory`` on: the
  method's defaults);
- ``qlora-heap``: ``--method qlora method.release_memory=false`` (glibc's default heap);
- ``qlora-nogc``: ``--method qlora method.gradient_checkpointing=false``.

Per run: tokens/s of the training steps (forward, backward, optimizer; real tokens, padding
not counted; the mean over all steps and the median of the per-step rates), peak RSS of the
process (``os.wait4``: the whole run, loading and export included) and at the end of training,
trainable parameters, and the held-out answer loss of the trained model: every model is
evaluated afterwards by the same code (``slimtune.evaluate.metrics.evaluate_causal_lm`` on the
``--eval-rows`` held-out chat rows tokenized as slimtune tokenizes them: mean NLL of the answer
tokens, the prompt as context).

    nice python bench/sft_throughput.py --data /work/assets/rt_instruct --steps 30 \\
        --out bench/results/sft_throughput.json

TRL needs ``pip install --no-deps trl datasets pyarrow pandas dill multiprocess xxhash``
(nothing else of torch/transformers/peft changes; ``pip install --dry-run trl`` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS: dict[str, dict[str, Any]] = {
    "slimtune": {"kind": "slimtune", "method": "lora", "what": "slimtune finetune --method lora (fp32)"},
    "trl": {"kind": "trl", "bf16": False, "gc": False, "what": "TRL SFTTrainer + PEFT LoRA, bf16=False, gradient_checkpointing=False"},
    "trl-labels": {"kind": "trl", "bf16": False, "gc": False, "labels": True,
                   "what": "TRL SFTTrainer + PEFT LoRA, bf16=False, gradient_checkpointing=False, fed slimtune's tokens and labels"},
    "trl-bf16": {"kind": "trl", "bf16": True, "gc": False, "what": "TRL SFTTrainer + PEFT LoRA, bf16=True, gradient_checkpointing=False"},
    "trl-defaults": {"kind": "trl", "bf16": True, "gc": True, "what": "TRL SFTTrainer + PEFT LoRA, SFTConfig defaults (bf16 autocast, gradient checkpointing)"},
    "slimtune-shuffled": {"kind": "slimtune", "method": "lora", "overrides": ["data.group_by_length=false"],
                          "what": "slimtune finetune --method lora data.group_by_length=false (random batches, as TRL)"},
    "slimtune-bf16": {"kind": "slimtune", "method": "lora", "precision": "bf16", "what": "slimtune finetune --method lora --precision bf16"},
    "lora-gc": {"kind": "slimtune", "method": "lora", "gc": True, "what": "slimtune finetune --method lora --gradient-checkpointing"},
    "qlora": {"kind": "slimtune", "method": "qlora", "what": "slimtune finetune --method qlora (NF4 base; gradient checkpointing: the method's default)"},
    "qlora-heap": {"kind": "slimtune", "method": "qlora", "overrides": ["method.release_memory=false"],
                   "what": "slimtune finetune --method qlora method.release_memory=false (glibc's default heap)"},
    "qlora-nogc": {"kind": "slimtune", "method": "qlora", "overrides": ["method.gradient_checkpointing=false"],
                   "what": "slimtune finetune --method qlora method.gradient_checkpointing=false"},
}
ENV = {"HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _sample_rows(src: Path, n: int | None, seed: int) -> list[str]:
    lines = [ln for ln in src.read_text(encoding="utf-8").split("\n") if ln.strip()]
    if n is not None and n < len(lines):
        keep = sorted(random.Random(seed).sample(range(len(lines)), n))
        lines = [lines[i] for i in keep]
    return lines


def prepare_files(data: Path, work: Path, a: argparse.Namespace) -> dict[str, str]:
    """The training sample (steps x batch rows), the held-out rows and 8 rows for slimtune's in-run eval."""
    work.mkdir(parents=True, exist_ok=True)
    files = {"train": (data / "train.jsonl", a.steps * a.batch_size), "heldout": (data / "test.jsonl", a.eval_rows),
             "tiny": (data / "dev.jsonl", 8)}
    out = {}
    for name, (src, n) in files.items():
        rows = _sample_rows(src, n, a.seed)
        if name == "train" and len(rows) < a.steps * a.batch_size:
            raise SystemExit(f"{src}: {len(rows)} rows, fewer than steps x batch = {a.steps * a.batch_size}")
        (work / f"{name}.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        out[name] = str(work / f"{name}.jsonl")
    return out


def _spawn(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd`` (stdout+stderr to ``log``); (exit status, peak RSS MB of that process, wall s)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **ENV}, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, ru.ru_maxrss / 1024, time.perf_counter() - t0


def _step_rates(seconds: list[float], tokens: list[int]) -> list[float]:
    """Per-step tokens/s from cumulative (seconds, tokens) after each step."""
    out, s0, t0 = [], 0.0, 0
    for s, t in zip(seconds, tokens, strict=True):
        if s > s0:
            out.append((t - t0) / (s - s0))
        s0, t0 = s, t
    return out


def run_slimtune(name: str, spec: dict[str, Any], files: dict[str, str], work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """``slimtune finetune`` in its own process; figures from its metrics.json / metrics.jsonl."""
    out = work / name
    cmd = [sys.executable, "-c", "import sys; from slimtune.cli.main import main; sys.exit(main())", "finetune",
           "--model", "smollm2", "--task", "causal-lm", "--method", spec["method"], "--train", files["train"],
           "--eval", files["tiny"], "--output", str(out), "--overwrite", "--max-length", str(a.max_length),
           "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--max-steps", str(a.steps), "--seed", str(a.seed),
           "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha), "--lora-dropout", str(a.lora_dropout),
           "--no-tensorboard", "--no-progress", "--log-every", "1", "--num-threads", str(a.threads),
           "--precision", spec.get("precision", "fp32"), *(["--gradient-checkpointing"] if spec.get("gc") else []),
           *spec.get("overrides", [])]
    rc, rss, wall = _spawn(cmd, work / f"{name}.log")
    if rc != 0:
        raise SystemExit(f"{name}: exit {rc}; see {work / f'{name}.log'}")
    m = json.loads((out / "metrics.json").read_text())
    events = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [e for e in events if "train/seconds" in e]
    rates = _step_rates([e["train/seconds"] for e in steps], [e["train/tokens"] for e in steps])
    tr = m["train"]
    return {"what": spec["what"], "command": " ".join(cmd[3:]), "steps": tr["steps"], "tokens": tr["tokens"],
            "train_seconds": tr["train_seconds"], "tokens_per_s": tr["tokens_per_s"],
            "tokens_per_s_median_step": median(rates), "peak_rss_mb": rss, "train_peak_rss_mb": tr["peak_rss_mb"],
            "trainable_params": m["trainable_params"], "params": m["params"], "wall_s": wall,
            "model_dir": str(out), "qlora": m.get("qlora")}


TRL_WORKER = r'''
import json, resource, sys, time, torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
from slimtune.methods._peft import default_target_modules
from slimtune.models.loading import count_params, resolve
a = json.loads(sys.argv[1])
if a["threads"]:
    torch.set_num_threads(a["threads"])
path = resolve("smollm2")
tok = AutoTokenizer.from_pretrained(path)
if a["labels"]:  # slimtune's tokenization and answer mask, pre-tokenized (TRL skips its own)
    from slimtune.data.chat import ChatRenderer, load_chat, tokenize_chat
    data = tokenize_chat(load_chat(a["train"]), tok, a["max_length"], renderer=ChatRenderer(tok, "auto"))
    ds = Dataset.from_dict({"input_ids": data.input_ids, "labels": data.token_labels})
else:
    rows = [json.loads(ln) for ln in open(a["train"], encoding="utf-8") if ln.strip()]
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
targets = default_target_modules(model)
args = SFTConfig(output_dir=a["out"], per_device_train_batch_size=a["bs"], max_steps=a["steps"], learning_rate=a["lr"],
                 lr_scheduler_type="linear", warmup_steps=0.06, weight_decay=0.01, max_grad_norm=1.0,
                 max_length=a["max_length"], seed=a["seed"], logging_steps=1, save_strategy="no", eval_strategy="no",
                 report_to=[], disable_tqdm=True, use_cpu=True, bf16=a["bf16"], gradient_checkpointing=a["gc"],
                 completion_only_loss=True, dataloader_num_workers=0)
peft = LoraConfig(task_type="CAUSAL_LM", r=a["r"], lora_alpha=a["alpha"], lora_dropout=a["dropout"],
                  target_modules=targets)
timing = {"seconds": [], "tokens": []}
class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        timing["seconds"].append(time.perf_counter() - self.t0)
        timing["tokens"].append(trainer._total_train_tokens)
    def on_train_end(self, args, state, control, **kw):
        timing["train_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft, callbacks=[Timer()])
labels = [sum(x != -100 for x in r["labels"]) for r in trainer.train_dataset]
out = trainer.train()
trained = trainer.model
result = {"trainable_params": count_params(trained, trainable_only=True), "params": count_params(trained),
          "train_runtime": out.metrics["train_runtime"], "answer_tokens_per_row": sum(labels) / len(labels), **timing}
merged = trained.merge_and_unload()
merged.save_pretrained(a["model_dir"])
tok.save_pretrained(a["model_dir"])
print("RESULT " + json.dumps(result))
'''


def run_trl(name: str, spec: dict[str, Any], files: dict[str, str], work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """TRL ``SFTTrainer`` + PEFT LoRA in its own process (the merged model is saved for the common evaluation)."""
    args = {"train": files["train"], "out": str(work / f"{name}-trainer"), "model_dir": str(work / name),
            "bs": a.batch_size, "steps": a.steps, "lr": a.lr, "max_length": a.max_length, "seed": a.seed,
            "r": a.lora_r, "alpha": a.lora_alpha, "dropout": a.lora_dropout, "threads": a.threads,
            "bf16": spec["bf16"], "gc": spec["gc"], "labels": spec.get("labels", False)}
    log = work / f"{name}.log"
    rc, rss, wall = _spawn([sys.executable, "-c", TRL_WORKER, json.dumps(args)], log)
    res = next((json.loads(ln[7:]) for ln in log.read_text().splitlines() if ln.startswith("RESULT ")), None)
    if rc != 0 or res is None:
        raise SystemExit(f"{name}: exit {rc}; see {log}")
    cum = [sum(res["seconds"][: i + 1]) for i in range(len(res["seconds"]))]
    rates = _step_rates(cum, res["tokens"])
    return {"what": spec["what"], "steps": len(res["seconds"]), "tokens": res["tokens"][-1],
            "train_seconds": cum[-1], "tokens_per_s": res["tokens"][-1] / cum[-1],
            "tokens_per_s_median_step": median(rates), "peak_rss_mb": rss,
            "train_peak_rss_mb": res["train_peak_rss_mb"], "trainable_params": res["trainable_params"],
            "params": res["params"], "wall_s": wall, "train_runtime": res["train_runtime"],
            "answer_tokens_per_row": res["answer_tokens_per_row"], "model_dir": str(work / name),
            "settings": {"bf16": spec["bf16"], "gradient_checkpointing": spec["gc"],
                         "slimtune_labels": spec.get("labels", False)}}


EVAL_WORKER = r'''
import json, sys, torch
from slimtune.data.chat import ChatRenderer, load_chat, tokenize_chat
from slimtune.evaluate.metrics import evaluate_causal_lm
from slimtune.models.loading import load_model, load_tokenizer
a = json.loads(sys.argv[1])
if a["threads"]:
    torch.set_num_threads(a["threads"])
out = {}
for name, d in a["models"].items():
    tok = load_tokenizer(d)
    data = tokenize_chat(load_chat(a["heldout"]), tok, a["max_length"], renderer=ChatRenderer(tok, "auto"))
    model = load_model(d, "causal-lm").eval()
    out[name] = {**evaluate_causal_lm(model, data, 8), "examples": len(data)}
    print(name, out[name], file=sys.stderr, flush=True)
print("RESULT " + json.dumps(out))
'''


def evaluate_all(models: dict[str, str], files: dict[str, str], work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Held-out answer loss of every trained model, by the same code, in one process."""
    log = work / "eval.log"
    args = {"models": models, "heldout": files["heldout"], "max_length": a.max_length, "threads": a.threads}
    rc, _, _ = _spawn([sys.executable, "-c", EVAL_WORKER, json.dumps(args)], log)
    res = next((json.loads(ln[7:]) for ln in log.read_text().splitlines() if ln.startswith("RESULT ")), None)
    if rc != 0 or res is None:
        raise SystemExit(f"evaluation: exit {rc}; see {log}")
    return res


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The side-by-side figures the targets are about (only for the runs that ran)."""
    out: dict[str, Any] = {}

    def pair(a: str, b: str) -> None:
        if a in runs and b in runs:
            ra, rb = runs[a], runs[b]
            out[f"{a}_vs_{b}"] = {
                "tokens_per_s": ra["tokens_per_s"] / rb["tokens_per_s"],
                "tokens_per_s_median_step": ra["tokens_per_s_median_step"] / rb["tokens_per_s_median_step"],
                "peak_rss": ra["peak_rss_mb"] / rb["peak_rss_mb"],
                "train_peak_rss": ra["train_peak_rss_mb"] / rb["train_peak_rss_mb"],
                "heldout_loss_rel_diff": (ra["heldout_answer_loss"] - rb["heldout_answer_loss"]) / rb["heldout_answer_loss"]}

    for a, b in (("slimtune", "trl"), ("slimtune", "trl-labels"), ("slimtune-shuffled", "trl"), ("slimtune", "trl-defaults"),
                 ("slimtune-bf16", "trl-bf16"), ("slimtune-bf16", "trl-defaults"),
                 ("slimtune-bf16", "trl"), ("qlora", "slimtune"), ("qlora", "lora-gc"), ("qlora-heap", "slimtune"),
                 ("qlora-nogc", "slimtune"),
                 ("lora-gc", "slimtune")):
        pair(a, b)
    return out


def seed_means(runs: dict[str, dict[str, Any]], names: list[str], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Per run kind, the mean of every figure over the seeds (and the spread of the held-out loss)."""
    keys = ("tokens_per_s", "tokens_per_s_median_step", "train_seconds", "peak_rss_mb", "train_peak_rss_mb",
            "heldout_answer_loss")
    out = {}
    for n in names:
        rs = [runs[f"{n}@s{s}"] for s in seeds]
        m: dict[str, Any] = {k: sum(r[k] for r in rs) / len(rs) for k in keys}
        losses = [r["heldout_answer_loss"] for r in rs]
        m.update(trainable_params=rs[0]["trainable_params"], seeds=seeds, heldout_answer_losses=losses,
                 heldout_answer_loss_std=(sum((x - m["heldout_answer_loss"]) ** 2 for x in losses) / (len(rs) - 1)) ** 0.5)
        out[n] = m
    return out


def table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the runs."""
    lines = ["| run | tokens/s (mean) | tokens/s (median step) | train s | peak RSS MB | train peak RSS MB | "
             "trainable | held-out answer loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in runs.items():
        lines.append(f"| {n} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_median_step']:.1f} | {r['train_seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['train_peak_rss_mb']:.0f} | {r['trainable_params']:,} | "
                     f"{r.get('heldout_answer_loss', float('nan')):.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen runs one after the other, evaluate them, print and write the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/assets/rt_instruct", help="folder with train/dev/test.jsonl (bench/make_instruct.py)")
    ap.add_argument("--runs", default="slimtune,trl,trl-labels,trl-defaults,slimtune-bf16,trl-bf16,qlora,lora-gc,qlora-heap", help=f"comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0, help="seed of the data sample (and of training without --seeds)")
    ap.add_argument("--seeds", help="comma-separated training seeds: every run once per seed, interleaved (run@sN), "
                                    "on the same data sample; the means are compared")
    ap.add_argument("--eval-rows", type=int, default=200, help="held-out rows (a seeded sample of test.jsonl)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every run (0: torch's default)")
    ap.add_argument("--work", help="scratch folder (default: a temp folder, removed)")
    ap.add_argument("--out", help="write the results JSON here")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="sft-bench-")
    work = Path(a.work or tmp.name)  # type: ignore[union-attr]
    files = prepare_files(Path(a.data), work, a)
    load_start = os.getloadavg()
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    runs: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        for n in names:
            spec, key = RUNS[n], n if len(seeds) == 1 else f"{n}@s{seed}"
            print(f"[sft-bench] {key}: {spec['what']}", file=sys.stderr, flush=True)
            runs[key] = (run_slimtune if spec["kind"] == "slimtune" else run_trl)(
                key, spec, files, work, argparse.Namespace(**{**vars(a), "seed": seed}))
            runs[key]["seed"] = seed
            print(f"[sft-bench] {key}: {runs[key]['tokens_per_s']:.1f} tokens/s, peak RSS "
                  f"{runs[key]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    losses = evaluate_all({n: r["model_dir"] for n, r in runs.items()}, files, work, a)
    for n, r in runs.items():
        r["heldout_answer_loss"] = losses[n]["loss"]
        r["heldout_answer_tokens"] = losses[n]["tokens"]
    means = seed_means(runs, names, seeds) if len(seeds) > 1 else runs
    from slimtune.benchmark.timing import hardware_fingerprint

    result = {"what": "chat SFT (answer-only loss) of SmolLM2-135M-Instruct: slimtune vs TRL SFTTrainer + PEFT, "
                      "QLoRA vs LoRA; each run in its own process, one after the other",
              "settings": {k: v for k, v in vars(a).items() if k not in ("work", "out")},
              "files": {k: {"path": v, "rows": sum(1 for _ in open(v, encoding="utf-8"))} for k, v in files.items()},
              "load_average": {"start": load_start, "end": os.getloadavg()},
              "hardware": hardware_fingerprint(), "runs": runs, "ratios": ratios(means),
              **({"seed_means": means, "ratios_per_seed": {s: ratios({n: runs[f"{n}@s{s}"] for n in names})
                                                           for s in seeds}} if len(seeds) > 1 else {}),
              "bench_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(table(runs))
    if len(seeds) > 1:
        print(f"means over seeds {seeds}:")
        print(table(means))
    print(json.dumps(result["ratios"], indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
