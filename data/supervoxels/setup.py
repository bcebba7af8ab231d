"""Build the 3D Felzenszwalb supervoxel extension in place.

Run from the repository root::

    python data/supervoxels/setup.py build_ext --inplace

This writes ``data/supervoxels/felzenszwalb_3d_cy*.so`` (and a generated ``.c`` file); both are build
outputs and are not committed.
"""

import os
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

REPO_ROOT = Path(__file__).resolve().parents[2]
# setuptools resolves sources and --inplace targets against the working directory.
os.chdir(REPO_ROOT)

extension = Extension(
    "data.supervoxels.felzenszwalb_3d_cy",
    sources=["data/supervoxels/felzenszwalb_3d_cy.pyx"],
    include_dirs=[np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    # No fused multiply-add: edge costs and thresholds must round exactly as the published float64 code.
    extra_compile_args=["-O3", "-ffp-contract=off"],
)

setup(
    name="difd-supervoxels",
    ext_modules=cythonize([extension], include_path=[str(REPO_ROOT)], language_level=3),
    zip_safe=False,
)
