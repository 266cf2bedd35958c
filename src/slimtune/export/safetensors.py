"""A clean merged folder for plain ``transformers``: config.json, model.safetensors, tokenizer, generation_config.

Whatever the source (a base + PEFT adapter, a method's own format, a quantized folder decoded to
float), the folder holds one plain model (:func:`slimtune.export.source.plain_model`) that
``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification.from_pretrained`` loads with no
slimtune code, in float32, float16 or bfloat16.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def write_safetensors_folder(model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike,
                             quant: str = "f32") -> dict[str, Any]:
    """Save ``model`` (cast to ``quant``'s dtype) and ``tokenizer`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[quant]
    if dtype != torch.float32:  # a copy: the caller's float32 model stays the check's reference
        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"dtype": str(dtype).removeprefix("torch."), "architecture": type(model).__name__}
