"""How much of a fine-tuned classifier survives cross-layer sharing *before* recovery training.

Applies the ``sharing`` method to a model folder for every (groups, init, relax_rank) given and
scores each on an eval file with no training at all. A cheap probe (seconds per setting) for
choosing which layers share and how the shared weights start, before paying for recovery.

Usage (from the repo root)::

    python bench/sharing_init.py --model FINETUNED --eval ../shared/data/sst2/test.tsv \
        --groups block cycle --init mean first --ranks 0 64 80 128

``block`` pairs neighbours (6 layers -> 0-1, 2-3, 4-5); ``cycle`` pairs layer i with i + L/G
(0-3, 1-4, 2-5), the "cycle" pattern of Relaxed Recursive Transformers (Bae et al., 2024);
both are the sharing method's ``pattern``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="fine-tuned classifier folder")
    ap.add_argument("--eval", required=True, help="labelled eval file")
    ap.add_argument("--n-groups", type=int, default=3)
    ap.add_argument("--groups", nargs="+", default=["block", "cycle"], choices=["block", "cycle"])
    ap.add_argument("--init", nargs="+", default=["mean", "first"], choices=["mean", "first"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 64, 80, 128])
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()

    import torch

    from slimtune.data.datasets import load_classification, tokenize_classification
    from slimtune.methods import MethodContext, get_method
    from slimtune.methods.sharing import SharingMethodConfig
    from slimtune.models.loading import load_model, load_tokenizer
    from slimtune.train.finetune import evaluate_any

    torch.set_num_threads(2)
    data = load_classification(a.eval)
    ev = tokenize_classification(data, load_tokenizer(a.model), a.max_length)
    base = load_model(a.model, "classification")
    rows = [{"setting": "unshared", "accuracy": evaluate_any(base.eval(), ev, "classification", data.label_names, 64)["accuracy"]}]
    print(f"unshared: {rows[0]['accuracy']:.4f}", flush=True)
    sharing = get_method("sharing")
    for pattern in a.groups:
        for init in a.init:
            for r in a.ranks:
                cfg = SharingMethodConfig(groups=a.n_groups, pattern=pattern, init=init, share="matrices",
                                          relax_rank=r)
                model = sharing.apply(load_model(a.model, "classification"), cfg,
                                      MethodContext(task="classification", total_steps=1, base_model=a.model))
                acc = evaluate_any(model.eval(), ev, "classification", data.label_names, 64)["accuracy"]
                rows.append({"groups": pattern, "init": init, "relax_rank": r, "accuracy": acc})
                print(f"{pattern:5s} init={init:5s} relax_rank={r:4d}: {acc:.4f}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "eval": a.eval, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
