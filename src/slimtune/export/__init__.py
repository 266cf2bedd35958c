"""Exporting a slimtune model folder to GGUF (llama.cpp), ONNX (onnxruntime) or a clean safetensors folder.

One concept per module: :mod:`~slimtune.export.settings` (what ``slimtune export`` does),
:mod:`~slimtune.export.source` (loading any slimtune output as one plain model),
:mod:`~slimtune.export.gguf` + :mod:`~slimtune.export.gguf_vocab` (weights and tokenizer as
GGUF), :mod:`~slimtune.export.onnx` (decoders with past key values, encoders),
:mod:`~slimtune.export.safetensors` (a merged transformers folder), :mod:`~slimtune.export.check`
(what every export is checked against) and :mod:`~slimtune.export.run` (the whole stage).
"""
