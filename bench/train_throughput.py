"""Training throughput: ``slimtune finetune`` vs Hugging Face ``Trainer``, side by side in one run.

Same model (packaged MiniLM), same training rows, batch size, epochs, learning rate, schedule
and seed; Trainer with its defaults (fused AdamW, DataCollatorWithPadding via the tokenizer).
Each side runs in its own subprocess (one after the other, same thread count) and reports
training samples/s (training loop only, no evaluation) and accuracy on the SST-2 test set.

    python bench/train_throughput.py --rows 8000 --epochs 1 [--bf16] [--out bench/results/train_throughput.json]

``--bf16`` adds both trainers again under bf16 autocast (CPUs with avx512_bf16 or AMX run it in
hardware; elsewhere it is emulated and slower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"

HF_SCRIPT = r"""
import json, sys, time, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
from slimtune.data.datasets import load_classification
from slimtune.models.loading import resolve
from slimtune.evaluate.evaluator import evaluate_classifier
from slimtune.data.datasets import tokenize_classification
a = json.loads(sys.argv[1])
torch.manual_seed(a["seed"])
path = resolve("minilm")
tok = AutoTokenizer.from_pretrained(path)
raw = load_classification(a["train"], max_rows=a["rows"], seed=a["seed"])
enc = tok(raw.texts, truncation=True, max_length=a["max_length"])
rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
         "token_type_ids": enc["token_type_ids"][i], "labels": raw.labels[i]} for i in range(len(raw))]
model = AutoModelForSequenceClassification.from_pretrained(
    path, num_labels=2, id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})
args = TrainingArguments(output_dir=a["out"], per_device_train_batch_size=a["bs"], num_train_epochs=a["epochs"],
                         learning_rate=a["lr"], warmup_steps=0.06, weight_decay=0.01, lr_scheduler_type="linear",
                         max_grad_norm=1.0, seed=a["seed"], report_to=[], save_strategy="no", eval_strategy="no",
                         logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                         bf16=a.get("precision") == "bf16")
trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tok)
out = trainer.train()
ev = load_classification(a["eval"], label_names=raw.label_names)
m = evaluate_classifier(model, tokenize_classification(ev, tok, a["max_length"]), raw.label_names)
print("RESULT " + json.dumps({"samples_per_s": out.metrics["train_samples_per_second"],
                              "train_seconds": out.metrics["train_runtime"], "accuracy": m["accuracy"]}))
"""


def run_hf(a: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", HF_SCRIPT, json.dumps(a)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def run_slimtune(a: dict) -> dict:
    out = Path(a["out"])
    cmd = [sys.executable, "-m", "slimtune.cli.main", "finetune", "--model", "minilm", "--train", a["train"],
           "--eval", a["eval"], "--output", str(out), "--max-train-samples", str(a["rows"]),
           "--epochs", str(a["epochs"]), "--batch-size", str(a["bs"]), "--lr", str(a["lr"]),
           "--max-length", str(a["max_length"]), "--seed", str(a["seed"]), "--precision", a.get("precision", "fp32"),
           "train.warmup_ratio=0.06",
           "train.tensorboard=false"]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    m = json.loads((out / "metrics.json").read_text())
    return {"samples_per_s": m["train"]["samples_per_s"], "train_seconds": m["train"]["train_seconds"],
            "accuracy": m["accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true", help="also run both trainers under bf16 autocast")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = {"train": str(DATA / "train.tsv"), "eval": str(DATA / "test.tsv"), "rows": args.rows,
                  "epochs": args.epochs, "bs": args.batch_size, "lr": args.lr, "max_length": args.max_length,
                  "seed": args.seed}
        hf = run_hf({**common, "out": f"{tmp}/hf"})
        st = run_slimtune({**common, "out": f"{tmp}/st"})
        rows = [("HF Trainer (defaults)", hf), ("slimtune finetune", st)]
        if args.bf16:
            hf16 = run_hf({**common, "out": f"{tmp}/hf16", "precision": "bf16"})
            st16 = run_slimtune({**common, "out": f"{tmp}/st16", "precision": "bf16"})
            rows += [("HF Trainer, bf16=True", hf16), ("slimtune finetune --precision bf16", st16)]
    ratio = st["samples_per_s"] / hf["samples_per_s"]
    print(f"MiniLM on {args.rows} SST-2 rows, bs {args.batch_size}, {args.epochs:g} epoch(s), "
          f"{os.cpu_count()} cores; accuracy on sst2/test.tsv (872 rows)\n")
    print("| trainer | samples/s | train s | accuracy |\n|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['samples_per_s']:.1f} | {r['train_seconds']:.1f} | {r['accuracy']:.4f} |")
    print(f"\nspeed-up: {ratio:.2f}x   accuracy difference: {100 * (st['accuracy'] - hf['accuracy']):+.2f} pt")
    result = {"hf_trainer": hf, "slimtune": st, "speedup": ratio, "settings": vars(args)}
    if args.bf16:
        result.update(hf_trainer_bf16=hf16, slimtune_bf16=st16,
                      speedup_bf16_vs_hf_fp32=st16["samples_per_s"] / hf["samples_per_s"],
                      speedup_bf16_vs_hf_bf16=st16["samples_per_s"] / hf16["samples_per_s"])
        print(f"bf16: slimtune {st16['samples_per_s'] / hf['samples_per_s']:.2f}x HF fp32, "
              f"{st16['samples_per_s'] / hf16['samples_per_s']:.2f}x HF bf16; accuracy "
              f"{100 * (st16['accuracy'] - hf['accuracy']):+.2f} pt vs HF fp32")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
