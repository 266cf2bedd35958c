#!/usr/bin/env bash
# The README's test command: install everything, then run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The report's screenshot test runs in real headless Chromium (Debian package).
bash scripts/install-chromium.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SLIMTUNE_NO_PROGRESS=1
ruff check src tests bench
python3 -m pytest -q -p no:cacheprovider "$@"
