"""What a model folder is (plain HF, quantized, ONNX) and how many weights it stores."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from slimtune.runtime.static import count_static_params, is_static


def model_kind(model_dir: str | os.PathLike) -> str:
    """'onnx', 'static', 'quantized' or 'hf': how slimtune stores (and therefore runs) a model folder."""

    d = Path(model_dir)
    if (d / "model.onnx").is_file():
        return "onnx"
    if is_static(d):
        return "static"
    if (d / "quantization.json").is_file():
        return "quantized"
    return "hf"


def count_stored_params(model_dir: str | os.PathLike) -> int:
    """Number of weights a model folder stores, read from file headers (no weights loaded).

    ONNX: elements of every initializer except quantization scales/zero points. Quantized
    folders: the logical shape of each quantized weight (``quantization.json``) plus the plain
    tensors. HF folders: every tensor in ``*.safetensors`` (top level only).
    """

    d = Path(model_dir)
    kind = model_kind(d)
    if kind == "onnx":
        import onnx  # optional dependency (the quant extra)

        graph = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
        return sum(math.prod(t.dims) for t in graph.initializer
                   if not t.name.endswith(("_scale", "_zero_point", "scale", "zero_point")))

    if kind == "static":
        return count_static_params(d)
    total = 0
    quant_meta: dict[str, Any] = {}
    if kind == "quantized":
        side = json.loads((d / "quantization.json").read_text())
        quant_meta = side.get("tensors", {})
        total += sum(math.prod(m["shape"]) for m in quant_meta.values())
    for p in sorted(d.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                if any(k.startswith(q + ".") for q in quant_meta):
                    continue  # codes/scales of a quantized weight: counted by its logical shape
                total += math.prod(f.get_slice(k).get_shape())
    return total
