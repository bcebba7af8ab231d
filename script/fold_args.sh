# Argument handling shared by script/train.sh and script/evaluate.sh (sourced, not run):
# "$1" dataset config (abd_mri|abd_ct|cmr, default abd_mri), "$2" setting (setting1|setting2, default
# setting1); both are shifted off, so "$@" keeps the Sacred overrides. Sets DATASET, SETTING, PYTHON and
# FOLDS (environment FOLDS="0 1 2 3 4" by default).
DATASET="${1:-abd_mri}"
SETTING="${2:-setting1}"
shift $(($# < 2 ? $# : 2))
case "$DATASET" in abd_mri|abd_ct|cmr) ;; *) echo "dataset must be abd_mri, abd_ct or cmr, got '$DATASET'" >&2; exit 2;; esac
case "$SETTING" in setting1|setting2) ;; *) echo "setting must be setting1 or setting2, got '$SETTING'" >&2; exit 2;; esac
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
FOLDS="${FOLDS:-0 1 2 3 4}"
