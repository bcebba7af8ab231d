#!/usr/bin/env bash
# Shared set-up for script/test.sh, script/demo.sh and script/learning_check.sh: creates .venv if absent
# (reuses it otherwise), installs the pinned requirements, installs the project itself in editable mode
# (`pip install -e .`: every module importable from anywhere) and builds the Cython supervoxel extension in
# place.
# Usage (from the repository root; leaves .venv activated):
#   source script/setup_env.sh install         set up as above
#   source script/setup_env.sh activate-only   only activate an existing .venv (CI and the tests, where
#                                              script/test.sh set it up already)
set -euo pipefail

mode="${1:?usage: source script/setup_env.sh install|activate-only}"
if [ "$mode" = activate-only ]; then
    if [ -x .venv/bin/python ]; then
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi
    return 0
elif [ "$mode" != install ]; then
    echo "setup_env.sh: expected install or activate-only, got $mode" >&2
    return 2
fi

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

# The project in editable mode, built with the pinned setuptools of .venv (no download). The editable
# install maps the packages it found, so it is redone when pyproject.toml or the set of packages changes.
project_stamp=.venv/.project.sha256
project_want="$( (cat pyproject.toml; ls -d -- */__init__.py) | sha256sum | cut -d' ' -f1)"
if [ ! -f "$project_stamp" ] || [ "$(cat "$project_stamp")" != "$project_want" ] \
    || ! python -c 'import importlib.metadata as m; m.distribution("difd")' >/dev/null 2>&1; then
    echo "[setup] installing the project in editable mode (pip install -e .)"
    python -m pip install --quiet --no-build-isolation --no-deps -e .
    echo "$project_want" > "$project_stamp"
fi

if [ -f data/supervoxels/setup.py ]; then
    echo "[setup] building the Cython supervoxel extension"
    python data/supervoxels/setup.py build_ext --inplace >/dev/null
fi
