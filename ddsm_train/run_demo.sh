#!/usr/bin/env bash
# The demo (`make demo`): ddsm_train/run_pipeline.py with ddsm_train/configs/demo.toml.
#
# Usage: bash ddsm_train/run_demo.sh [OUT_DIR]     (default: demo_out/demo)
# A second run into the same OUT_DIR skips every stage that is unchanged.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="${PYTHON:-python3}"; fi
exec "$PY" "$HERE/run_pipeline.py" "$HERE/configs/demo.toml" --out "${1:-demo_out/demo}"
