#!/usr/bin/env bash
# The README's main command: install, then fine-tune -> distill -> prune -> quantize -> evaluate ->
# bench -> report on the packaged MiniLM and an SST-2 subsample; prints the summary table.
# Needs the data in ../shared/data/sst2 (see recipes/quickstart.yaml to point elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  bash scripts/install.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SLIMTUNE_NO_PROGRESS=1
slimtune run recipes/quickstart.yaml "$@"
