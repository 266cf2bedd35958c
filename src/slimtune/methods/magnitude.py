"""Magnitude pruning as a training method: one-shot or gradual (cubic schedule), or N:M (2:4).

``apply`` picks the weights to prune (every ``nn.Linear`` of the transformer blocks; the task
head and pooler are never pruned) and sets masks; ``on_step_end`` raises the sparsity on the
cubic schedule of Zhu & Gupta (2017, "To prune, or not to prune") over the run's
``MethodContext.total_steps`` and re-applies the masks after every optimizer step, so pruned
weights stay exactly zero during recovery training; ``export`` makes the zeros permanent,
writes a plain dense checkpoint plus ``sparsity.json`` (per-layer sparsity) and, where it
really saves bytes, a compact bitmask copy under ``sparse/``.

Honest limits: zeros in a dense ``model.safetensors`` take as many bytes as any other value and
a dense matmul with zeros in it is no faster. Unstructured sparsity saves bytes only in the
bitmask sidecar (read back with :func:`load_sparse_sidecar`) and speed only with a sparse
kernel; 2:4 patterns run faster only on GPUs with sparse tensor cores (NVIDIA Ampere and
newer, via ``torch.sparse.to_sparse_semi_structured``), never on CPU.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimtune.config.fields import RecipeError, setting
from slimtune.methods import MethodContext, register_method

# Modules never pruned: the task head and pooler are tiny and their rows are the classes.
EXCLUDED = ("classifier", "score", "lm_head", "pooler", "pre_classifier")
SIDECAR_FORMAT = "slimtune-bitmask-v1"


@dataclass
class MagnitudeConfig:
    """Unstructured magnitude pruning (Zhu & Gupta, 2017) or N:M semi-structured masks."""

    sparsity: float = setting(0.5, "magnitude: final fraction of zeros in the pruned weights (ignored for N:M patterns).", ge=0, lt=1)
    schedule: Literal["gradual", "oneshot"] = setting("gradual", "magnitude: 'gradual' raises sparsity on the cubic schedule during training; 'oneshot' prunes to the final sparsity before training.")
    scope: Literal["global", "layer"] = setting("global", "magnitude: one threshold over all pruned weights ('global': layers end up with different sparsity) or the same sparsity in every layer ('layer').")
    pattern: str = setting("unstructured", "magnitude: 'unstructured' or 'N:M' (e.g. '2:4': keep the N largest of every M consecutive input weights; speed only on GPUs with sparse tensor cores).")
    initial_sparsity: float = setting(0.0, "magnitude: sparsity at the start of the gradual schedule (s_i).", ge=0, lt=1)
    begin: float = setting(0.0, "magnitude: fraction of the run's steps at which gradual pruning starts (t0).", ge=0, le=1)
    end: float = setting(0.7, "magnitude: fraction of the run's steps at which the final sparsity is reached; the rest of the run recovers.", ge=0, le=1)
    frequency: int = setting(10, "magnitude: recompute the masks every N optimizer steps (delta t of the schedule).", ge=1)
    include_embeddings: bool = setting(False, "magnitude: also prune the input embedding matrix.")
    sparse_sidecar: Literal["auto", "on", "off"] = setting("auto", "magnitude: write a bitmask-compressed copy under sparse/ ('auto': only when it is smaller than the dense file).")

    def validate(self, recipe: Any = None) -> None:

        if not 0 <= self.sparsity < 1:
            raise RecipeError(f"method.sparsity: must be in [0, 1), got {self.sparsity}")
        if not 0 <= self.initial_sparsity <= self.sparsity:
            raise RecipeError(f"method.initial_sparsity: must be in [0, sparsity={self.sparsity}], got {self.initial_sparsity}")
        if not 0 <= self.begin < self.end <= 1:
            raise RecipeError(f"method.begin/end: need 0 <= begin < end <= 1, got {self.begin}, {self.end}")
        if self.frequency < 1:
            raise RecipeError(f"method.frequency: must be >= 1, got {self.frequency}")
        parse_pattern(self.pattern)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``'unstructured'`` -> None; ``'2:4'`` -> (2, 4). Raises RecipeError otherwise."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):

        raise RecipeError(f"method.pattern: expected 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return int(m.group(1)), int(m.group(2))


def cubic_sparsity(step: int, total_steps: int, final: float, initial: float = 0.0,
                   begin: float = 0.0, end: float = 0.7, frequency: int = 1) -> float:
    """Sparsity at optimizer step ``step`` on the schedule of Zhu & Gupta (2017), eq. 1.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3`` for t in {t0, t0+dt, ..., t0+n*dt}:
    pruning is fast at first, while redundant weights abound, and slows as few are left.
    Here t0 = begin * total_steps, t0 + n*dt = end * total_steps, and ``step`` is rounded down
    to the last multiple of ``frequency`` after t0 (masks only change at those steps).
    """
    t0 = int(round(begin * total_steps))
    t_end = max(t0 + 1, int(round(end * total_steps)))
    if step < t0:
        return initial
    if step >= t_end:
        return final
    t = t0 + ((step - t0) // frequency) * frequency
    progress = (t - t0) / (t_end - t0)
    return final + (initial - final) * (1.0 - progress) ** 3


def prunable_weights(model: torch.nn.Module, include_embeddings: bool = False) -> dict[str, torch.nn.Parameter]:
    """``{name: weight}`` of every Linear in the transformer blocks (head and pooler excluded)."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(p in EXCLUDED for p in name.split(".")):
            out[f"{name}.weight"] = mod.weight
    if include_embeddings:
        emb = model.get_input_embeddings()
        for name, p in model.named_parameters():
            if p is emb.weight:
                out[name] = p
    if not out:
        raise ValueError("no Linear layers to prune were found in the model")
    return out


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing the ``sparsity`` fraction of smallest-|w| entries.

    ``scope='global'`` ranks all weights together (one threshold); ``'layer'`` prunes each
    tensor to ``sparsity`` on its own. Ties at the threshold are broken by position, so the
    number of zeros is exact.
    """
    if sparsity <= 0:
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    if scope == "layer":
        return {n: _topk_mask(w.detach().abs().flatten(), sparsity).view_as(w) for n, w in weights.items()}
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _topk_mask(flat, sparsity)
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = keep[start:start + w.numel()].view_as(w)
        start += w.numel()
    return out


def _topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    n_prune = int(round(sparsity * scores.numel()))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.topk(scores, n_prune, largest=False, sorted=False).indices] = False
    return keep


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest |w| in every group of ``m`` consecutive input weights of each row."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs the input size ({cols}) to be a multiple of M={m}")
    groups = weight.detach().abs().reshape(rows, cols // m, m)  # (out, in/m, m)
    idx = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def sparsity_report(model: torch.nn.Module, names: list[str] | None = None) -> dict[str, Any]:
    """Fraction of exact zeros per pruned weight, over them all, and over the whole model."""
    params = dict(model.named_parameters())
    names = names if names is not None else list(prunable_weights(model))
    per_layer = {n: float((params[n] == 0).float().mean()) for n in names}
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    numel = sum(params[n].numel() for n in names)
    total_zeros = sum(int((p == 0).sum()) for p in params.values())
    total = sum(p.numel() for p in params.values())
    return {"per_layer": per_layer, "pruned_weights_sparsity": zeros / max(numel, 1),
            "model_sparsity": total_zeros / max(total, 1), "pruned_numel": numel, "model_numel": total}


# --------------------------------------------------------------------------------------------
# Compact storage: bitmask + nonzero values (only where it is smaller than dense)
# --------------------------------------------------------------------------------------------

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)  # (n/8, 8)
    return (flat * _BITS).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.view(-1, 1) & _BITS).ne(0)  # (n/8, 8)
    return bits.flatten()[:numel]


def save_sparse_sidecar(state: dict[str, torch.Tensor], path: str | Path, mode: str = "auto",
                        dense_bytes: int | None = None) -> dict[str, Any]:
    """Write ``state`` with each sparse-enough float tensor as bitmask + nonzero values.

    A tensor of n fp32 values with k nonzeros costs n/8 + 4k bytes this way instead of 4n, so it
    is stored compactly only when that is smaller (sparsity above ~3%). With ``mode='auto'``
    the file is written only if its total is smaller than ``dense_bytes``. Returns a summary
    (``written``, ``bytes``, ``dense_bytes``). Read it back with :func:`load_sparse_sidecar`.
    """

    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        nnz = int((t != 0).sum())
        compact = t.numel() // 8 + 1 + nnz * t.element_size()
        if t.is_floating_point() and t.ndim >= 1 and compact < t.numel() * t.element_size():
            out[f"{name}::bitmask"] = _pack_bits(t != 0)
            out[f"{name}::values"] = t[t != 0].contiguous()
            shapes[name] = list(t.shape)
        else:
            out[name] = t
    total = sum(v.numel() * v.element_size() for v in out.values())
    dense = dense_bytes if dense_bytes is not None else sum(v.numel() * v.element_size() for v in state.values())
    summary = {"written": False, "bytes": total, "dense_bytes": dense, "compact_tensors": len(shapes)}
    if mode == "on" or (mode == "auto" and total < dense):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(out, str(path), metadata={"format": SIDECAR_FORMAT, "shapes": json.dumps(shapes)})
        summary.update(written=True, bytes=path.stat().st_size, path=str(path))
    return summary


def load_sparse_sidecar(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_sparse_sidecar` back into a dense state dict."""

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{path}: not a {SIDECAR_FORMAT} file (metadata format={meta.get('format')!r})")
        shapes = json.loads(meta["shapes"])
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        values = raw.pop(f"{name}::values")
        mask = _unpack_bits(raw.pop(f"{name}::bitmask"), math.prod(shape))
        dense = torch.zeros(math.prod(shape), dtype=values.dtype)
        dense[mask] = values
        state[name] = dense.view(shape)
    state.update(raw)
    return state


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


class _PruneState:
    """Masks and bookkeeping kept on the model while it trains (dropped at export)."""

    def __init__(self, names: list[str], total_steps: int):
        self.names = names
        self.total_steps = total_steps
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = -1.0  # sparsity the current masks were computed for
        self.hooks: list[Any] = []


def _state(model: torch.nn.Module) -> _PruneState:
    st = getattr(model, "_slimtune_magnitude", None)
    if st is None:
        raise RuntimeError("magnitude pruning was not applied to this model (call apply first)")
    return st


class MagnitudeMethod:
    # Every remaining weight trains, as in full fine-tuning; gradual pruning needs the steps
    # of its schedule to recover, hence the higher floor.
    defaults = {"train.lr": 1e-4, "train.epochs": 3.0, "train.min_steps": 400}
    task_defaults = {"causal-lm": {"train.min_steps": 0}}
    name = "magnitude"
    config_cls = MagnitudeConfig

    def apply(self, model: torch.nn.Module, cfg: MagnitudeConfig, ctx: MethodContext) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        weights = prunable_weights(model, cfg.include_embeddings)
        st = _PruneState(list(weights), ctx.total_steps)
        object.__setattr__(model, "_slimtune_magnitude", st)  # plain attribute, not a submodule
        for name, w in weights.items():
            # Pruned weights get zero gradient: AdamW moments stay clean and clipping is honest.
            st.hooks.append(w.register_hook(lambda g, n=name: g * st.masks[n] if n in st.masks else g))
        nm = parse_pattern(cfg.pattern)
        if nm is not None or cfg.schedule == "oneshot":
            self._update(model, cfg, cfg.sparsity)
        else:
            self._update(model, cfg, cubic_sparsity(0, ctx.total_steps, cfg.sparsity, cfg.initial_sparsity,
                                                    cfg.begin, cfg.end, cfg.frequency))
        return model

    def current_sparsity(self, model: torch.nn.Module, cfg: MagnitudeConfig, step: int) -> float:
        """Target sparsity of the masks after optimizer step ``step``."""
        if parse_pattern(cfg.pattern) is not None or cfg.schedule == "oneshot":
            return cfg.sparsity
        return cubic_sparsity(step, _state(model).total_steps, cfg.sparsity, cfg.initial_sparsity,
                              cfg.begin, cfg.end, cfg.frequency)

    def _update(self, model: torch.nn.Module, cfg: MagnitudeConfig, sparsity: float) -> None:
        st = _state(model)
        params = dict(model.named_parameters())
        weights = {n: params[n] for n in st.names}
        if sparsity != st.sparsity:
            nm = parse_pattern(cfg.pattern)
            if nm is not None:
                st.masks = {n: nm_mask(w, *nm) if w.ndim == 2 else torch.ones_like(w, dtype=torch.bool)
                            for n, w in weights.items()}
            else:
                # Already-pruned weights are 0, the smallest magnitude: masks only ever grow.
                st.masks = magnitude_masks(weights, sparsity, cfg.scope)
            st.sparsity = sparsity
        with torch.no_grad():
            for n, w in weights.items():
                w.mul_(st.masks[n])

    def on_step_end(self, model: torch.nn.Module, cfg: MagnitudeConfig, step: int) -> None:
        self._update(model, cfg, self.current_sparsity(model, cfg, step))

    def export(self, model: torch.nn.Module, cfg: MagnitudeConfig, out_dir: Path, ctx: MethodContext) -> torch.nn.Module:
        st = _state(model)
        self._update(model, cfg, self.current_sparsity(model, cfg, st.total_steps))  # final masks
        for h in st.hooks:
            h.remove()
        object.__delattr__(model, "_slimtune_magnitude")
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        report = sparsity_report(model, st.names)
        report.update(pattern=cfg.pattern, scope=cfg.scope, schedule=cfg.schedule, target_sparsity=cfg.sparsity)
        dense = out_dir / "model.safetensors"
        if cfg.sparse_sidecar != "off" and dense.is_file():

            side = save_sparse_sidecar(load_file(str(dense)), out_dir / "sparse" / "model.safetensors",
                                       cfg.sparse_sidecar, dense.stat().st_size)
            report["sparse_sidecar"] = side
        report["note"] = ("zeros in the dense model.safetensors take the same bytes and a dense matmul is "
                          "not faster; sparse/model.safetensors (bitmask + values, read with "
                          "slimtune.methods.magnitude.load_sparse_sidecar) saves bytes; N:M patterns are "
                          "faster only on GPUs with sparse tensor cores.")
        (out_dir / "sparsity.json").write_text(json.dumps(report, indent=2) + "\n")
        return model

    def load_exported(self, path: Path, task: str, dtype: str) -> None:
        """None: the export is a plain transformers folder."""
        return None


register_method(MagnitudeMethod())
