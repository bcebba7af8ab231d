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
# Two processes (pytest-xdist; DIFD_TEST_WORKERS=0 runs in this one). --dist loadfile keeps each test file
# on one worker, in order: its module fixtures (mini roots, reference runs) are built once, and the grid
# tests that share the SLURM cluster (tests/test_grid_e2e.py) never overlap. The 25 slowest tests are
# listed at the end of every run (pyproject.toml).
python -m pytest -n "${DIFD_TEST_WORKERS:-2}" --dist loadfile "$@"
