#!/usr/bin/env bash
# Shared set-up for script/test.sh and script/demo.sh: creates .venv if absent (reuses it otherwise),
# installs the pinned requirements and builds the Cython supervoxel extension in place.
# Usage: source script/setup_env.sh   (from the repository root; leaves .venv activated)
set -euo pipefail

PYTHON_BIN="${PYTHON_BIN:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $PYTHON_BIN"
    "$PYTHON_BIN" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

# Reinstall only when requirements.txt changed since the last successful install.
stamp=.venv/.requirements.sha256
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing requirements.txt into .venv"
    python -m pip install --quiet -r requirements.txt
    echo "$want" > "$stamp"
fi

if [ -f data/supervoxels/setup.py ]; then
    echo "[setup] building the Cython supervoxel extension"
    python data/supervoxels/setup.py build_ext --inplace >/dev/null
fi
