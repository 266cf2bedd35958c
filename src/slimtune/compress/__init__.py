"""Compression stages: distillation, pruning and quantization."""
