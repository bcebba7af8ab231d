#!/usr/bin/env bash
# Download the wheels a GPU host without internet needs for train.py/test.py into .whl/ (gitignored).
# Usage: bash script/fetch_gpu_wheels.sh [python version, default 3.12]
# The host is assumed to have torch, torchvision, numpy, scipy, scikit-image, opencv, Cython and tqdm (the
# benchmarks need nothing else); this fetches Sacred with its pure-Python dependencies, setuptools (Sacred
# 0.8.7 imports pkg_resources, gone from setuptools 81) and SimpleITK (the NIfTI reader of dataloaders/io.py;
# nibabel is not fetched: no module of train.py/test.py imports it). Versions of the packages named in
# requirements.txt come from it; their dependencies are pinned here. Sizes: SimpleITK 53 MB, the rest 1.5 MB
# (the device tool carries at most 64 MiB per call, repository and data included). On the host:
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
    "$(pinned sacred)" "$(pinned setuptools)" "$(pinned SimpleITK)"
    # Sacred's dependencies that the GPU image lacks (it has colorama, packaging, py-cpuinfo, wrapt).
    docopt-ng==0.9.0 jsonpickle==4.1.4 munch==4.0.0 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3
)
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
ls -l .whl
