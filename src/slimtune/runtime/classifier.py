"""Load any classifier folder slimtune writes (ONNX, quantized or plain HF) as one callable."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimtune.compress.quant.api import dequantize_
from slimtune.compress.quant.backends import to_torch_dynamic
from slimtune.compress.quant.onnx import load_onnx_classifier
from slimtune.compress.quant.storage import load_quantized
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.runtime.static import is_static, load_static


def load_classifier(model_dir: str | os.PathLike, threads: int | None = None) -> Any:
    """A callable ``(input_ids, attention_mask=None, token_type_ids=None) -> logits`` for any
    folder slimtune writes: ONNX (``model.onnx``), static-embedding (``slimtune.runtime.static``),
    quantized (``quantization.json``; int8 per-channel runs on torch's int8 kernels, other
    schemes are decoded to float) or plain HF.
    Returns float32 logits (batch, num_labels) as a torch tensor."""
    d = Path(model_dir)
    if (d / "model.onnx").is_file():

        return load_onnx_classifier(d, threads)
    if is_static(d):  # static-embedding student (slimtune.runtime.static): numpy
        return load_static(d, threads)

    if threads:
        torch.set_num_threads(threads)
    if (d / "quantization.json").is_file():

        model = dequantize_(to_torch_dynamic(load_quantized(d)))
    else:

        model = load_model(str(d), "classification")
    model.eval()

    def run(input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        kw = {"attention_mask": torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)}
        if token_type_ids is not None:
            kw["token_type_ids"] = torch.as_tensor(token_type_ids)
        with torch.inference_mode():
            return model(input_ids=ids, **kw).logits.float()

    run.config = model.config.to_dict()  # type: ignore[attr-defined]
    return run


def load_predict(model_dir: str | os.PathLike, threads: int | None = None) -> tuple[Callable[[dict[str, Any]], Any], Any]:
    """``(predict(batch) -> logits, tokenizer)`` for any classifier folder slimtune writes.

    Uses :func:`slimtune.compress.quant.recipe.load_classifier` (ONNX Runtime, quantized or plain HF), so
    fp32, pruned, quantized and ONNX folders are all timed through the runtime they ship for.
    """

    clf = load_classifier(model_dir, threads)
    tok = load_tokenizer(str(model_dir))

    def predict(batch: dict[str, Any]) -> Any:
        return clf(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))

    predict.config = getattr(clf, "config", {})  # type: ignore[attr-defined]
    return predict, tok
