#!/usr/bin/env bash
# Download the wheels a GPU host without internet needs for train.py/test.py into .whl/ (gitignored).
# Usage: bash script/fetch_gpu_wheels.sh [python version, default 3.12]
# The host is assumed to have torch, torchvision, numpy, scipy, scikit-image, opencv, Cython, tqdm, packaging
# and typing-extensions (a torch dependency); the benchmarks need nothing else. This fetches Sacred with its
# pure-Python dependencies, setuptools (Sacred 0.8.7 imports pkg_resources, gone from setuptools 81) and
# nibabel (dataloaders/nifti.py reads and writes NIfTI with it when SimpleITK is missing; its other dependency,
# importlib-resources, is fetched only for Python < 3.12), and submitit with cloudpickle (script/launch.py
# --cluster local). SimpleITK (53 MB) is not fetched: only preprocessing and supervoxel generation need it.
# Versions of the packages named in requirements.txt come from it; their dependencies are pinned here. Size
# for Python 3.12: 4.9 MB in all before submitit (nibabel 3.3 MB) plus 0.1 MB (submitit 76 kB, cloudpickle
# 22 kB), far below the 64 MiB the device tool carries per call with the repository and the 58 MB of
# CHAOST2 data (check: du -sh .whl). On the host:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION="${1:-3.12}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
pinned() {  # the "name==version" line of requirements.txt for $1
    local line
    line="$(grep -i -E "^$1==" requirements.txt)" || { echo "requirements.txt pins no $1" >&2; exit 1; }
    echo "$line"
}
PACKAGES=(
    "$(pinned sacred)" "$(pinned setuptools)" "$(pinned nibabel)"
    # Sacred's dependencies that the GPU image lacks (it has colorama, packaging, py-cpuinfo, wrapt).
    docopt-ng==0.9.0 jsonpickle==4.1.4 munch==4.0.0 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3
    # script/launch.py --cluster local (submitit and its one dependency besides typing-extensions).
    "$(pinned submitit)" cloudpickle==3.1.3
)
# nibabel 5.4 requires importlib-resources on Python < 3.12 (numpy, packaging, typing-extensions: on the host)
if [ "$(printf '%s\n' "$PY_VERSION" 3.12 | sort -V | head -n1)" != 3.12 ]; then
    PACKAGES+=(importlib-resources==7.1.0)
fi
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
ls -l .whl
du -ch .whl/*.whl | tail -n1
