"""Quantization components (one concept per file); the CLI and run API are in ``slimtune.compress.quant.recipe``.

- ``linear.py``: affine int8/int4 codes, granularity, bit packing, SQNR.
- ``codebook.py``: NF4 and k-means codebooks.
- ``api.py``: configs, the handler registry, ``quantize_``, quantized modules.
- ``storage.py``: ``quantized.safetensors`` + ``quantization.json``; dequantized export.
- ``onnx.py``: ONNX export, ORT fusion and int8 quantization, ``load_onnx_classifier``.
- ``backends.py``: CPU int8 backends, parity scoring and the choice by measurement.
- ``qat.py``: fake-quant recovery fine-tuning through ``slimtune.train.loop.train``.
- ``kernels.py``: weight-only int8/int4 ``nn.Linear`` on torch's CPU kernels (decoders).
- ``decoder.py``: causal LMs: torch kernels vs llama.cpp GGUF, chosen by measured decode speed.
"""
