"""Static-embedding students: model2vec's distillation of the fine-tuned teacher, then task KD.

model2vec (Tulkens & van Dongen, 2024) turns a sentence encoder into a table of token vectors:
every vocabulary token goes through the encoder alone, the outputs are reduced by PCA and
weighted by SIF over Zipf-estimated frequencies, and a text is the mean of its tokens' rows.
It distils the *base* encoder and then trains a classifier on the hard labels. Here the table
comes from the *fine-tuned* teacher's encoder, and the whole student (table and linear head)
then learns the teacher's soft labels over the training text (task KD, cached teacher logits
shared with the layer-dropped students of ``slimtune compress``):

1. ``token_vectors``: ``[CLS] t [SEP]`` through the teacher's encoder, mean of the last hidden
   states, for every token id t (cached on disk per teacher and vocabulary);
2. ``pca_reduce`` to ``dims`` components (centred), then ``sif_weights``: row t is scaled by
   a / (a + p(t)), with p from Zipf's law over the tokens ranked by their count in the training
   text (ties and unseen tokens by id);
3. ``train_static``: Adam on α·CE(labels) + (1−α)·T²·KL(teacher ‖ student) over the training
   rows, every row of the table and the head trainable, the best epoch by accuracy on 10% of
   the training rows held out (early stopping: the table overfits in a few epochs);
4. saved by :func:`slimtune.runtime.static.save_static` (safetensors + config.json + the
   teacher's tokenizer): no torch or slimtune needed to predict.

The student predicts ``W · mean(E[t] for t in text) + b``; special tokens are never pooled.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.compress.distill.cache import hash_files, teacher_cache
from slimtune.compress.distill.losses import kd_loss
from slimtune.config.fields import RecipeError, check_ranges, save_settings, setting
from slimtune.data.datasets import (
    TokenizedData,
    collate,
    epoch_batches,
    load_classification,
    tokenize_classification,
)
from slimtune.evaluate.evaluator import evaluate_model_dir
from slimtune.io import atomic_dir, atomic_write_json, atomic_write_text, weights_size_mb
from slimtune.models.loading import cache_dir, label_names_of, load_model, load_tokenizer
from slimtune.runtime.static import load_static_arrays, save_static


@dataclass
class StaticSettings:
    """How a static-embedding student is built from a fine-tuned classifier and trained by KD."""

    model: str = setting(help="Fine-tuned classifier folder: the teacher (its encoder embeds the vocabulary; its logits are the soft labels).", metavar="DIR")
    train: str = setting(help="Training file: soft labels (and hard labels) and the token counts of the SIF weights.", metavar="FILE")
    output: str = setting(help="Output folder of the student.", metavar="DIR")
    eval: str | None = setting(None, "Labelled file to report accuracy on after training (never used to train).", metavar="FILE")
    dims: int = setting(256, "Embedding width after PCA (at most the teacher's hidden size).", ge=1)
    storage: Literal["float32", "float16", "int8"] = setting("float16", "How the table is stored: float32, float16 or int8 rows (per-row scale).")
    sif: float = setting(1e-4, "SIF coefficient a: row weight a / (a + p(token)), p by Zipf's law over token ranks.", gt=0, lt=1)
    epochs: float = setting(20.0, "Most passes over the training rows (early stopping on the held-out rows usually ends sooner).", gt=0)
    val_fraction: float = setting(0.1, "Fraction of the training rows held out (per label) to pick the best epoch; 0: train on all, no early stopping.", ge=0, lt=1)
    patience: int = setting(3, "Epochs without a held-out accuracy gain before training stops.", ge=1)
    lr: float = setting(5e-3, "Adam learning rate (table and head).", gt=0)
    batch_size: int = setting(32, "Training batch size.", ge=1)
    alpha: float = setting(0.5, "Weight of hard-label CE (1 - alpha on the KD term).", ge=0, le=1)
    temperature: float = setting(2.0, "Distillation softmax temperature.", gt=0)
    max_length: int = setting(128, "Tokens per training example (the teacher's view of the text).", ge=2)
    max_train_samples: int | None = setting(None, "Training rows (a seeded sample; default all).", ge=1)
    embed_batch_size: int = setting(256, "Tokens per teacher forward when embedding the vocabulary.", ge=1)
    cache_dir: str | None = setting(None, "Folder of teacher-logit and token-vector caches (default: $SLIMTUNE_CACHE/distill).", metavar="DIR")
    seed: int = setting(42, "Seed of sampling, initialisation and batch order.")

    def validate(self) -> None:
        """Ranges and files, before any weight loads (errors name the setting)."""

        check_ranges(self, "static")
        if not (Path(self.model) / "config.json").is_file():
            raise RecipeError(f"static.model: not a model folder (no config.json): {self.model}")
        for key, path in (("train", self.train), ("eval", self.eval)):
            if path is not None and not Path(path).is_file():
                raise RecipeError(f"static.{key}: file not found: {path}")
        if self.storage not in ("float32", "float16", "int8"):
            raise RecipeError(f"static.storage: {self.storage!r} is not one of float32, float16, int8")


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class StaticClassifier(nn.Module):
    """``logits = head(mean of table rows over the pooled tokens)``: the trainable student.

    ``keep`` (V,) bool marks the token ids that are pooled (False: special tokens).
    """

    def __init__(self, table: torch.Tensor, num_labels: int, keep: torch.Tensor):
        super().__init__()
        # sparse: a step touches only the rows of its batch (Adam over the whole table would cost
        # a pass over V x d floats per step, 1 s a step for MiniLM's 30k x 256 on a busy CPU)
        self.table = nn.Embedding.from_pretrained(table.float().clone(), freeze=False, sparse=True)
        self.head = nn.Linear(table.shape[1], num_labels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("keep", keep.bool().clone(), persistent=False)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d) mean of the rows of the pooled tokens (zeros for a text with none)."""
        w = self.keep[input_ids].float()
        if attention_mask is not None:
            w = w * (attention_mask != 0).float()
        s = torch.einsum("bt,btd->bd", w, self.table(input_ids))
        return s / w.sum(1, keepdim=True).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask))


# --------------------------------------------------------------------------------------------
# Building the table (model2vec's recipe, on the fine-tuned encoder)
# --------------------------------------------------------------------------------------------


def special_ids(tokenizer: Any) -> list[int]:
    """Token ids that are never pooled: every special token of the tokenizer."""
    return sorted({int(i) for i in tokenizer.all_special_ids if i is not None})


@torch.no_grad()
def token_vectors(encoder: nn.Module, tokenizer: Any, batch_size: int = 256) -> torch.Tensor:
    """(V, H): each token id t as ``[CLS] t [SEP]`` through ``encoder``, mean over the three
    positions of the last hidden state (model2vec's mean pooling). Special tokens get zeros."""

    vocab = len(tokenizer)
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    prefix, suffix = [cls] if cls is not None else [], [sep] if sep is not None else []
    encoder.eval()
    out = torch.zeros(vocab, encoder.config.hidden_size)
    for start in range(0, vocab, batch_size):
        ids = torch.arange(start, min(vocab, start + batch_size))
        x = torch.cat([torch.tensor(prefix).repeat(len(ids), 1), ids[:, None],
                       torch.tensor(suffix).repeat(len(ids), 1)], dim=1).long()
        h = encoder(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
        out[ids] = h.float().mean(1)
    out[torch.tensor(special_ids(tokenizer), dtype=torch.long)] = 0.0
    return out


def cached_token_vectors(teacher: Any, teacher_dir: str, tokenizer: Any, root: Path,
                         batch_size: int = 256) -> tuple[torch.Tensor, str]:
    """:func:`token_vectors` of the teacher's encoder, cached in ``root`` by the teacher's file
    hash and the vocabulary (a later student of another width reuses them). Returns (vectors, 'hit'|'miss')."""

    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    key = hashlib.sha256((hash_files(teacher_dir) + vocab + "mean-v1").encode()).hexdigest()[:24]
    path = root / f"tokvec-{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["vectors"], "hit"
        except (OSError, KeyError, RuntimeError):
            pass  # torn file: recompute
    print(f"[slimtune] static: embedding {len(tokenizer):,} tokens through the teacher's encoder "
          f"(cached in {path})", file=sys.stderr)
    vec = token_vectors(teacher.base_model, tokenizer, batch_size)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"vectors": vec.contiguous()}, str(tmp))
    tmp.replace(path)
    return vec, "miss"


def pca_reduce(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Centre ``x`` (N, H) and project it on its first ``min(dims, H, N)`` principal axes (SVD)."""
    xc = x.double() - x.double().mean(0, keepdim=True)
    _, _, vt = torch.linalg.svd(xc, full_matrices=False)
    return (xc @ vt[: min(dims, x.shape[1])].T).float()


def token_counts(data: TokenizedData, vocab: int) -> torch.Tensor:
    """(V,) how often each token id occurs in ``data``."""
    c = collections.Counter(i for ids in data.input_ids for i in ids)
    out = torch.zeros(vocab)
    for i, n in c.items():
        if 0 <= i < vocab:
            out[i] = n
    return out


def sif_weights(counts: torch.Tensor, a: float = 1e-4) -> torch.Tensor:
    """(V,) SIF weights ``a / (a + p)`` with p from Zipf's law (p ∝ 1 / (rank + 1)) over the
    tokens ranked by ``counts`` (descending; ties, and tokens never seen, by id)."""
    v = len(counts)
    order = sorted(range(v), key=lambda i: (-float(counts[i]), i))
    rank = torch.empty(v)
    rank[torch.tensor(order)] = torch.arange(v, dtype=torch.float)
    p = 1.0 / (rank + 2.0)
    p = p / p.sum()
    return a / (a + p)


def init_table(vectors: torch.Tensor, counts: torch.Tensor, dims: int, sif: float) -> torch.Tensor:
    """PCA to ``dims`` over the non-zero rows (special tokens stay zero), then SIF-weighted rows.
    Fewer columns than ``dims`` when the teacher is narrower or has fewer tokens."""
    live = vectors.abs().sum(1) > 0
    reduced = pca_reduce(vectors[live], dims)  # at most min(dims, hidden, live tokens) columns
    table = torch.zeros(vectors.shape[0], reduced.shape[1])
    table[live] = reduced
    return table * sif_weights(counts, sif)[:, None]


# --------------------------------------------------------------------------------------------
# Training: the teacher's soft labels over the training text
# --------------------------------------------------------------------------------------------


def batch_loss(model: StaticClassifier, batch: dict[str, torch.Tensor], teacher_logits: torch.Tensor,
               alpha: float, temperature: float) -> torch.Tensor:
    """α·CE on the hard labels + (1 − α)·T²·KL(teacher ‖ student) for one collated batch."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    hard = F.cross_entropy(logits, batch["labels"]) if alpha > 0 else None
    return kd_loss(logits, teacher_logits[batch["example_ids"]], hard, alpha, temperature)


@torch.no_grad()
def mean_loss(model: StaticClassifier, data: TokenizedData, teacher_logits: torch.Tensor, alpha: float,
              temperature: float, batch_size: int = 256) -> float:
    """The training objective averaged over every row of ``data`` (eval mode, no update)."""
    total, n = 0.0, 0
    for idx in epoch_batches(data.lengths(), batch_size, 0, 0, shuffle=False):
        b = collate(data, idx)
        total += float(batch_loss(model, b, teacher_logits, alpha, temperature)) * len(idx)
        n += len(idx)
    return total / max(n, 1)


def subset(data: TokenizedData, idx: list[int]) -> TokenizedData:
    """The rows ``idx`` of ``data`` (same padding id, pairs flag)."""
    return TokenizedData([data.input_ids[i] for i in idx],
                         None if data.token_type_ids is None else [data.token_type_ids[i] for i in idx],
                         None if data.labels is None else [data.labels[i] for i in idx], data.pad_id,
                         pairs=data.pairs)


def holdout(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): a seeded ``fraction`` of each label's rows is held out
    (at least one row of a label with two or more; none when ``fraction`` is 0)."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = collections.defaultdict(list)
    for i, y in enumerate(labels):
        by_label[y].append(i)
    val: list[int] = []
    for y in sorted(by_label):
        rows = by_label[y]
        rng.shuffle(rows)
        k = 0 if fraction <= 0 or len(rows) < 2 else max(1, round(fraction * len(rows)))
        val.extend(rows[:k])
    held = set(val)
    return [i for i in range(len(labels)) if i not in held], sorted(val)


@torch.no_grad()
def accuracy(model: StaticClassifier, data: TokenizedData, batch_size: int = 256) -> float:
    """Hard-label accuracy of ``model`` on ``data``."""
    right = 0
    for idx in epoch_batches(data.lengths(), batch_size, 0, 0, shuffle=False):
        b = collate(data, idx)
        right += int((model(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).sum())
    return right / max(1, len(data))


def train_static(model: StaticClassifier, data: TokenizedData, teacher_logits: torch.Tensor, *,
                 epochs: float, lr: float, batch_size: int, alpha: float, temperature: float,
                 seed: int = 42, val: TokenizedData | None = None, patience: int = 3) -> dict[str, Any]:
    """Adam over the table (sparse: the rows of each batch) and the head on the KD objective;
    linear warm-up (5%) and decay over ``epochs``.

    ``data`` must carry labels (rows of ``teacher_logits`` in order). With ``val`` (labelled
    held-out rows), its accuracy is measured after every epoch, the best epoch's weights are kept
    and training stops after ``patience`` epochs without a gain (a static table of 30k x 256
    trainable rows overfits a few thousand texts in a few epochs). Returns the objective over
    the training rows before and after, the held-out accuracies, steps and seconds.
    """
    data.example_ids = True
    before = mean_loss(model, data, teacher_logits, alpha, temperature)
    per_epoch = math.ceil(len(data) / batch_size)
    total = max(1, round(epochs * per_epoch))
    opts = [torch.optim.SparseAdam(list(model.table.parameters()), lr=lr),
            torch.optim.Adam(list(model.head.parameters()), lr=lr)]
    warm = max(1, total // 20)

    def factor(s: int) -> float:
        return min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))

    scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in opts]
    torch.manual_seed(seed)
    t0, step, epoch, curve = time.perf_counter(), 0, 0, []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    while step < total:
        model.train()
        for idx in epoch_batches(data.lengths(), batch_size, seed, epoch):
            loss = batch_loss(model, collate(data, idx), teacher_logits, alpha, temperature)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, sc in zip(opts, scheds, strict=True):
                o.step()
                sc.step()
            step += 1
            if step >= total:
                break
        epoch += 1
        if val is not None:
            model.eval()
            curve.append(accuracy(model, val))
            if best is None or curve[-1] > best[0]:
                best = (curve[-1], epoch, {k: v.clone() for k, v in model.state_dict().items()})
            elif epoch - best[1] >= patience:
                break
    if best is not None:
        model.load_state_dict(best[2])
    model.eval()
    after = mean_loss(model, data, teacher_logits, alpha, temperature)
    return {"loss_before": before, "loss_after": after, "steps": step, "epochs_run": epoch,
            "best_epoch": best[1] if best else epoch, "val_accuracy": curve,
            "train_seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------
# The whole build
# --------------------------------------------------------------------------------------------


def _label_names(teacher: Any) -> list[str]:
    names = label_names_of(teacher)
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):  # a config without label names
        names = [str(i) for i in range(len(names))]
    return names


def run_static(s: StaticSettings) -> dict[str, Any]:
    """Build, train and save a static-embedding student of ``s.model``; return its metrics.

    Writes ``s.output`` atomically: ``model.safetensors``, ``config.json``, tokenizer files,
    ``static.yaml`` (the settings), ``recipe.yaml`` (max_length, for ``slimtune evaluate``) and
    ``metrics.json``. Runs on one thread (restored after): every op is small (3-token teacher
    forwards, a batch's rows of the table), so more threads only add synchronisation, and on a
    shared CPU they thrash (10x slower steps measured with 2 threads on a loaded 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_static(s)
    finally:
        torch.set_num_threads(threads)


def _run_static(s: StaticSettings) -> dict[str, Any]:
    s.validate()
    t_start = time.perf_counter()
    teacher = load_model(s.model, "classification").eval()
    tok = load_tokenizer(s.model)
    names = _label_names(teacher)
    rows = load_classification(s.train, label_names=names, max_rows=s.max_train_samples, seed=s.seed)
    data = tokenize_classification(rows, tok, s.max_length)
    root = Path(s.cache_dir) if s.cache_dir else cache_dir() / "distill"
    t_hash = hash_files(s.model)
    cache = teacher_cache(teacher, s.model, data, root, settings={"teacher_dtype": "float32",
                                                                 "task": "classification"},
                          teacher_hash=t_hash)
    t_logits = cache.all()
    vectors, vec_status = cached_token_vectors(teacher, s.model, tok, root, s.embed_batch_size)
    del teacher
    keep = torch.ones(len(vectors), dtype=torch.bool)
    keep[torch.tensor(special_ids(tok), dtype=torch.long)] = False
    torch.manual_seed(s.seed)
    table = init_table(vectors, token_counts(data, len(vectors)), s.dims, s.sif)
    model = StaticClassifier(table, len(names), keep)
    tr_idx, val_idx = holdout(data.labels, s.val_fraction, s.seed)
    fit = train_static(model, subset(data, tr_idx), t_logits[torch.tensor(tr_idx, dtype=torch.long)],
                       epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, alpha=s.alpha,
                       temperature=s.temperature, seed=s.seed, val=subset(data, val_idx) if val_idx else None,
                       patience=s.patience)
    with atomic_dir(s.output) as tmp:
        save_static(tmp, model.table.weight.detach().numpy(), model.head.weight.detach().numpy(),
                    model.head.bias.detach().numpy(),
                    {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)},
                     "ignore_ids": special_ids(tok), "teacher": str(s.model)}, s.storage)
        tok.save_pretrained(tmp)
        save_settings(s, tmp / "static.yaml")
        atomic_write_text(tmp / "recipe.yaml", f"data: {{max_length: {s.max_length}}}\n")
    result = {**fit, "teacher_cache": cache.status, "token_vectors": vec_status, "rows": len(data),
              "vocab_size": int(table.shape[0]), "dims": int(table.shape[1]), "storage": s.storage,
              "size_mb": weights_size_mb(s.output), "seconds": round(time.perf_counter() - t_start, 2),
              "settings": asdict(s)}
    if s.eval:
        result["eval"] = {k: v for k, v in evaluate_model_dir(s.output, s.eval, max_length=s.max_length).items()
                          if k in ("accuracy", "macro_f1", "n")}
    atomic_write_json(Path(s.output) / "metrics.json", result)
    return result


def restore_static(src: str | Path, dst: str | Path, storage: str) -> dict[str, Any]:
    """Copy a static student with its table stored as ``storage`` (e.g. int8 rows): no training."""

    arr = load_static_arrays(src)
    cfg = {k: v for k, v in arr["config"].items() if k not in ("storage",)}
    with atomic_dir(dst) as tmp:
        save_static(tmp, arr["embeddings"], arr["head.weight"], arr["head.bias"], cfg, storage)
        for p in Path(src).iterdir():
            if p.is_file() and p.name not in ("model.safetensors", "config.json", "metrics.json",
                                              "candidate.json", "metrics.jsonl"):
                (tmp / p.name).write_bytes(p.read_bytes())
    return {"storage": storage, "size_mb": weights_size_mb(dst)}
