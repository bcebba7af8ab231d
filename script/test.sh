#!/usr/bin/env bash
# The project's one test command: bash script/test.sh [extra pytest arguments]
# Sets up .venv (created if absent, reused otherwise), installs requirements.txt, builds the Cython
# extension, then runs ruff and pytest. Pytest collecting no test is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

source script/setup_env.sh install

echo "[test] ruff check"
ruff check .

echo "[test] pytest"
# pytest exits 5 when it collects no test; that is a failure here, as any other non-zero code.
python -m pytest "$@"
