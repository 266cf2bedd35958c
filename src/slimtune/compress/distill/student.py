"""Building a student from a teacher: keep some of its layers (with their weights), or narrow it.

Layer dropping (DistilBERT, Sanh et al. 2019): the student is the teacher's architecture with
``num_hidden_layers = N``; embeddings, head, final norm and the kept layers are copied from the
teacher, so the student starts close to it. Works for any transformers model whose blocks sit
in one ``ModuleList`` (BERT ``encoder.layer``, Llama ``model.layers``, GPT-2 ``h``, ...).
Per-layer config lists of length L (``layer_types`` of Llama-family configs) are sliced too.

Narrower students (``hidden_size`` smaller than the teacher's) cannot reuse the teacher's
matrices: they are freshly initialised and need intermediate-layer KD and many more steps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from slimtune.models.loading import ModelError

LAYER_LIST_NAMES = ("layer", "layers", "h", "block", "blocks")


def uniform_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """N teacher layer indices spread evenly from the first to the last (6 → 3: [0, 2, 5]).

    The first layer reads the embeddings and the last feeds the (fine-tuned) head, so both ends
    are kept; the rest are evenly spaced.
    """
    if not 1 <= n_student <= n_teacher:
        raise ModelError(f"student layers must be in 1..{n_teacher} (the teacher's layer count), got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)})


def find_layer_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The dotted name and the ``ModuleList`` holding the model's transformer blocks."""
    n = int(model.config.num_hidden_layers)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n and name.split(".")[-1] in LAYER_LIST_NAMES]
    if len(found) != 1:
        names = [nm for nm, _ in found]
        raise ModelError(f"{type(model).__name__}: cannot find its single list of {n} transformer blocks "
                         f"(candidates: {names or 'none'}); pass a student model folder instead")
    return found[0]


def parse_layer_map(text: str | Sequence[int], n_teacher: int) -> list[int]:
    """Validate a layer map ('0,2,5' or [0, 2, 5]): distinct, increasing, within the teacher."""
    items = [int(x) for x in (text.split(",") if isinstance(text, str) else text)]
    if not items:
        raise ModelError("student layer map is empty")
    if sorted(set(items)) != items:
        raise ModelError(f"student layer map {items}: indices must be distinct and increasing")
    if items[0] < 0 or items[-1] >= n_teacher:
        raise ModelError(f"student layer map {items}: indices must be in 0..{n_teacher - 1}")
    return items


def _slice_per_layer_fields(cfg: Any, keep: list[int], n_teacher: int) -> None:
    """Cut config lists that have one entry per layer (``layer_types`` and the like)."""
    if n_teacher < 2:
        return
    for key, value in cfg.to_dict().items():
        if key != "architectures" and isinstance(value, list) and len(value) == n_teacher:
            setattr(cfg, key, [value[i] for i in keep])


def student_from_layers(teacher: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """A copy of ``teacher`` with only the layers ``keep`` (in order), weights copied.

    Returns a new model of the teacher's class; the teacher is not modified.
    """
    n_teacher = int(teacher.config.num_hidden_layers)
    keep = parse_layer_map(keep, n_teacher)
    prefix, _ = find_layer_list(teacher)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(keep)
    _slice_per_layer_fields(cfg, keep, n_teacher)
    dtype = next(teacher.parameters()).dtype
    student = type(teacher)(cfg).to(dtype)
    position = {t: s for s, t in enumerate(keep)}
    state: dict[str, torch.Tensor] = {}
    head = prefix + "."
    for k, v in teacher.state_dict().items():
        if k.startswith(head):
            idx, rest = k[len(head):].split(".", 1)
            if int(idx) not in position:
                continue  # a dropped layer
            k = f"{head}{position[int(idx)]}.{rest}"
        state[k] = v.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ModelError(f"student weights do not match the teacher's: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    return student


def narrow_student(teacher: torch.nn.Module, n_layers: int, hidden_size: int) -> torch.nn.Module:
    """A freshly initialised student of the teacher's family: ``n_layers`` × ``hidden_size``.

    Head size (head_dim) is kept; heads, KV heads and the FFN width scale with the width.
    """
    tc = teacher.config
    d_t = int(tc.hidden_size)
    heads = int(tc.num_attention_heads)
    head_dim = _head_dim(tc, hidden_size)
    cfg = copy.deepcopy(tc)
    new_heads = hidden_size // head_dim
    cfg.hidden_size = hidden_size
    cfg.num_attention_heads = new_heads
    if getattr(tc, "num_key_value_heads", None):
        group = max(1, heads // int(tc.num_key_value_heads))  # keep the GQA group size
        cfg.num_key_value_heads = max(1, new_heads // group)
    if getattr(tc, "head_dim", None):
        cfg.head_dim = head_dim
    if getattr(tc, "intermediate_size", None):
        cfg.intermediate_size = int(tc.intermediate_size) * hidden_size // d_t
    n_teacher = int(tc.num_hidden_layers)
    keep = uniform_layer_map(n_teacher, n_layers)
    cfg.num_hidden_layers = n_layers
    _slice_per_layer_fields(cfg, keep, n_teacher)
    dtype = next(teacher.parameters()).dtype
    return type(teacher)(cfg).to(dtype)


def _head_dim(tc: Any, hidden_size: int) -> int:
    """The teacher's head size, which a narrow student of width ``hidden_size`` keeps."""
    head_dim = int(getattr(tc, "head_dim", None) or int(tc.hidden_size) // int(tc.num_attention_heads))
    if hidden_size % head_dim:
        raise ModelError(f"student hidden size {hidden_size} must be a multiple of the head size {head_dim}")
    return head_dim


def check_student_spec(tc: Any, *, layers: int | None = None, layer_map: Sequence[int] | str | None = None,
                       hidden_size: int | None = None) -> None:
    """Raise the ModelError :func:`build_student` would, from the teacher's config ``tc`` alone.

    ``slimtune validate`` calls it: the layer count, the layer map and the width are checked
    against the teacher without loading its weights.
    """
    n_teacher = int(tc.num_hidden_layers)
    if hidden_size is not None and hidden_size != int(tc.hidden_size):
        n = layers or (len(parse_layer_map(layer_map, n_teacher)) if layer_map else n_teacher)
        _head_dim(tc, hidden_size)
        uniform_layer_map(n_teacher, n)
        return
    if layer_map:
        keep = parse_layer_map(layer_map, n_teacher)
        if layers is not None and layers != len(keep):
            raise ModelError(f"--student-layers {layers} disagrees with the layer map {keep}")
    elif layers is not None:
        uniform_layer_map(n_teacher, layers)
    else:
        raise ModelError("say how to build the student: student layers, a layer map, or a student model folder")


def build_student(teacher: torch.nn.Module, *, layers: int | None = None,
                  layer_map: Sequence[int] | str | None = None,
                  hidden_size: int | None = None) -> tuple[torch.nn.Module, list[int] | None]:
    """Student from the teacher: kept layers (uniform or explicit map), optionally narrower.

    Returns:
        (student, kept) where ``kept`` lists the teacher layer each student layer came from
        (None for a freshly initialised narrow student).
    """
    n_teacher = int(teacher.config.num_hidden_layers)
    if hidden_size is not None and hidden_size != int(teacher.config.hidden_size):
        n = layers or (len(parse_layer_map(layer_map, n_teacher)) if layer_map else n_teacher)
        return narrow_student(teacher, n, hidden_size), None
    if layer_map:
        keep = parse_layer_map(layer_map, n_teacher)
        if layers is not None and layers != len(keep):
            raise ModelError(f"--student-layers {layers} disagrees with the layer map {keep}")
    elif layers is not None:
        keep = uniform_layer_map(n_teacher, layers)
    else:
        raise ModelError("say how to build the student: student layers, a layer map, or a student model folder")
    return student_from_layers(teacher, keep), keep
