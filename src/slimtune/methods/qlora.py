"""QLoRA (Dettmers et al., 2023): LoRA on top of frozen base linear weights held in 4-bit NF4.

``apply`` puts PEFT LoRA on the model exactly as the ``lora`` method does, then replaces the base
layer of every LoRA-wrapped linear by an :class:`NF4Linear`: 4-bit NF4 codes (two per byte) plus
one float32 absmax per block of ``block_size`` weights (the codebook and block layout of
``slimtune.compress.quant.codebook``), about 4.5 bits a weight instead of 32. The float base
weights are freed. Forward decodes the weight on the fly; backward decodes it again instead of
keeping a float copy per layer for the gradient (the frozen weight needs no gradient, only the
input does), so no float copy of any quantized weight outlives a layer's call.

Memory. QLoRA is the memory-first method; three things make the NF4 base pay off in peak RSS:

- ``method.gradient_checkpointing`` (default true, as in the QLoRA paper and PEFT's
  ``prepare_model_for_kbit_training``): with the base in 4 bits, a decoder's training step holds
  mostly activations, so each layer's are recomputed in the backward pass (decoding is one table
  lookup per byte, two weights, so a recomputed forward costs little more than its matmuls);
- the weights that stay float are copied out of the memory-mapped checkpoint
  (:func:`own_float_weights`), so the file pages quantization read are released;
- ``method.release_memory`` (default true): glibc's heap otherwise keeps the freed activations of
  a step (~1 GB for SmolLM2 at batch 8 x 128 tokens, with checkpointing) as free-but-resident
  memory; allocations of 1 MB and more are then mmapped and returned when freed, at the price of
  page faults (slower steps). ``bench/sft_throughput.py`` measures each part against LoRA.

What stays float: embeddings, norms, the LM head (tied to the embeddings in SmolLM2) and the
classification head, as in QLoRA. The LoRA matrices train in float32.

Export. The trained model computes ``decode(NF4(W)) + B A``; that is what is merged and written
(``config.json`` + ``model.safetensors``, plain transformers), so the exported model gives the
outputs that were evaluated during training. The PEFT adapter under ``adapter/`` is also written
(``PeftModel.from_pretrained(base, DIR/adapter)``); applied onto the original float base it
differs from the trained model by the NF4 rounding of the base (small, not zero).
``qlora.json`` records how many layers and bytes were held in NF4.

Checkpoints hold the LoRA weights only; on resume the NF4 codes are recomputed from the base
(deterministic), so a resumed run continues exactly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.compress.quant.codebook import NF4_CODE, encode_nf4
from slimtune.config.fields import setting
from slimtune.methods import MethodContext, register_method
from slimtune.methods._peft import default_target_modules, export_peft, peft_task_type


@dataclass
class QLoraMethodConfig:
    """QLoRA: LoRA via PEFT over an NF4 (4-bit) frozen base."""

    r: int = setting(16, "qlora: rank of the LoRA update matrices (flag --lora-r).", ge=1)
    alpha: float = setting(32.0, "qlora: scaling numerator; the update is scaled by alpha / r (flag --lora-alpha).", gt=0)
    dropout: float = setting(0.05, "qlora: dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[str] | None = setting(None, "qlora: module names to adapt (their base weights go to NF4); None: every linear layer of the transformer blocks.")
    block_size: int = setting(64, "qlora: consecutive base weights sharing one absmax (QLoRA: 64).", ge=2)
    release_memory: bool = setting(True, "qlora: return freed memory to the OS as tensors die (glibc malloc: allocations >= 1 MB mmapped, Linux): otherwise the heap keeps ~1 GB of freed activations a step of SmolLM2 at batch 8 x 128; costs page faults (steps ~40% slower here). Process-wide from apply on.")
    gradient_checkpointing: bool = setting(True, "qlora: recompute each layer's activations in the backward pass, as QLoRA and PEFT's prepare_model_for_kbit_training do: once the base is 4-bit, activations are most of the training memory (~30% more compute). false: model.gradient_checkpointing decides.")
    export: Literal["both", "merged", "adapter"] = setting("both", "qlora: what to write: merged model (dequantized base + LoRA), PEFT adapter under adapter/, or both.")



class _NF4Matmul(torch.autograd.Function):
    """``x @ decode(W).T + b`` whose backward decodes W again instead of saving it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        w = ctx.layer.dequantized_weight(grad.dtype)  # (out, in)
        return grad @ w, None


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` stored as NF4 codes + block absmax, decoded on every call."""

    def __init__(self, linear: nn.Linear, block_size: int = 64):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size = block_size
        device = linear.weight.device
        meta, t = encode_nf4(linear.weight.detach().float().cpu(), block_size)
        self.register_buffer("qdata", t["qdata"].to(device))  # (numel / 2,) uint8
        self.register_buffer("absmax", t["absmax"].to(device))  # (numel / block_size,) float32
        # byte -> (code of its high nibble, code of its low nibble): one lookup decodes two weights
        pairs = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)
        self.register_buffer("pairs", pairs.to(device), persistent=False)  # (256, 2)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._dtype = linear.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The decoded float weight (for code that reads ``.weight``: dtype/device checks)."""
        return self.dequantized_weight(self._dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """decode_nf4's values (code * absmax), (out, in): one table lookup per byte (two weights),
        6x faster than unpacking the nibbles first (1536 x 576 on one core: 1.6 ms vs 9.8 ms)."""
        w = F.embedding(self.qdata.int(), self.pairs).view(-1, self.block_size).mul_(self.absmax[:, None])
        return w.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the decoded weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.qdata.device, dtype=self._dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight(self._dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block_size={self.block_size}"


def quantize_lora_bases(model: nn.Module, block_size: int) -> dict[str, int]:
    """Swap the base layer of every PEFT LoRA linear for an :class:`NF4Linear` (in place).

    Layers whose weight count ``block_size`` does not divide stay float. Returns counts:
    layers quantized / kept float, float bytes replaced, NF4 bytes stored.
    """
    stats = {"layers": 0, "kept_float": 0, "float_bytes": 0, "nf4_bytes": 0}
    for mod in list(model.modules()):
        base = getattr(mod, "base_layer", None)
        if not isinstance(base, nn.Linear) or not hasattr(mod, "lora_A"):
            continue
        if base.weight.numel() % block_size:
            stats["kept_float"] += 1
            continue
        q = NF4Linear(base, block_size)
        stats["layers"] += 1
        stats["float_bytes"] += base.weight.numel() * base.weight.element_size()
        stats["nf4_bytes"] += q.qdata.numel() + q.absmax.numel() * 4
        mod.base_layer = q
    return stats


def dequantize_lora_bases(model: nn.Module) -> None:
    """Put plain ``nn.Linear`` layers (decoded weights) back where :class:`NF4Linear` sits."""
    for mod in list(model.modules()):
        if isinstance(getattr(mod, "base_layer", None), NF4Linear):
            mod.base_layer = mod.base_layer.to_linear()


def own_float_weights(model: nn.Module) -> None:
    """Copy the weights that stay float (embeddings, norms, head) out of the loaded file.

    transformers 5 maps a safetensors checkpoint into memory and its tensors are views of that
    mapping; once the quantized linears' float weights are gone, the embeddings and norms would
    still keep the whole mapping, and the file pages that quantization read (the full float
    model) resident. Owned copies let it go.
    """
    with torch.no_grad():
        for mod in model.modules():
            for p in mod.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.clone()
            for name, b in mod.named_buffers(recurse=False):
                if b is not None and not isinstance(mod, NF4Linear):
                    mod._buffers[name] = b.clone()


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
RELEASE_THRESHOLD = 1 << 20


def release_freed_memory() -> bool:
    """Make glibc malloc serve allocations of >= 1 MB with mmap, so they go back to the OS when
    freed (fixed threshold: no dynamic raise). True when set (glibc), False elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, RELEASE_THRESHOLD))
    except (OSError, AttributeError):
        return False


class QLoraMethod:
    # LoRA's rates (the adapters are the same; only the frozen base is 4-bit): 1e-3 for
    # classifiers, 2e-4 for decoders (Dettmers et al., 2023).
    defaults = {"train.lr": 1e-3, "train.epochs": 3.0, "train.min_steps": 400}
    task_defaults = {"causal-lm": {"train.lr": 2e-4, "train.min_steps": 0}}
    name = "qlora"
    config_cls = QLoraMethodConfig

    def apply(self, model: nn.Module, cfg: QLoraMethodConfig, ctx: MethodContext) -> nn.Module:
        from peft import LoraConfig, get_peft_model  # optional dependency (the peft extra)

        config = LoraConfig(task_type=peft_task_type(ctx.task), r=cfg.r, lora_alpha=cfg.alpha,
                            lora_dropout=cfg.dropout,
                            target_modules=cfg.target_modules or default_target_modules(model),
                            base_model_name_or_path=ctx.base_model)
        if cfg.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
            # transformers 5 names it activation_checkpointing_enable (the old name warns); non-reentrant
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model = get_peft_model(model, config)
        model._slimtune_qlora = quantize_lora_bases(model, cfg.block_size)  # read back by export
        own_float_weights(model)
        if cfg.release_memory:
            model._slimtune_qlora["release_memory"] = release_freed_memory()
        return model

    def on_step_end(self, model: nn.Module, cfg: Any, step: int) -> None:
        pass

    def export(self, model: nn.Module, cfg: QLoraMethodConfig, out_dir: Path, ctx: MethodContext) -> nn.Module:
        info = {"block_size": cfg.block_size, **getattr(model, "_slimtune_qlora", {}),
                "merged_into": "the NF4-decoded base weights (what was trained and evaluated)"}
        (out_dir / "qlora.json").write_text(json.dumps(info, indent=1))
        dequantize_lora_bases(model)
        return export_peft(model, out_dir, cfg.export, ctx.base_model)


register_method(QLoraMethod())
