"""Helpers of the run-level tests (train.py / test.py on real data).

:func:`make_mini_root`: a miniature CHAOST2 data root, the first six cases of the real copy, linked. Fold 1 is
then positions 4-5 (support = position 4, case 8; one query volume, position 5, case 10) and training uses
positions 0-3 (``debug`` keeps 3 of them). ``edited_labels`` replaces chosen label files by copies with
some classes removed (to test the class checks).

:func:`load_test_script`: ``test.py`` loaded as a module (:func:`load_script`, which loads any script by
its path), so that its ``test`` command runs in the test process (``ex.run``) without a Python start-up;
loaded by path because ``test`` is a stdlib package name.
Such a run, and any OpenCV work in the pytest process, goes inside :func:`one_thread`: the scripts' kernels
(they run with ``OMP_NUM_THREADS=1`` in the tests), and no OpenCV thread pool left alive in the pytest
process, where it makes the ``cv2.setNumThreads`` of later DataLoader workers (forked copies) hang.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import torch

from dataloaders import get_dataset_info, list_cases, read_volume, write_volume

REPO = Path(__file__).resolve().parent.parent
N_CASES = 6


def make_mini_root(
    data_root: Path,
    root: Path,
    edited_labels: dict[int, list[int]] | None = None,
    blank_supervoxels: tuple[int, ...] = (),
) -> Path:
    """Link the first :data:`N_CASES` CHAOST2 cases (image, label, supervoxels) of ``data_root`` into
    ``root``; ``edited_labels`` maps a case id to the class values whose voxels its label copy loses;
    ``blank_supervoxels``: case ids whose supervoxel copy holds no supervoxel (all 0)."""
    info = get_dataset_info("CHAOST2")
    image_dir = root / "CHAOST2" / info.image_folder
    sv_dir = root / "CHAOST2" / info.supervoxel_folder()
    image_dir.mkdir(parents=True)
    sv_dir.mkdir(parents=True)
    edited_labels = edited_labels or {}
    for case in list_cases("CHAOST2", data_root, supervoxels=True)[:N_CASES]:
        (image_dir / case.image.name).symlink_to(case.image)
        if case.case_id in blank_supervoxels:
            supervoxels, geometry = read_volume(case.supervoxel)
            write_volume(np.zeros_like(supervoxels), geometry, sv_dir / case.supervoxel.name)
        else:
            (sv_dir / case.supervoxel.name).symlink_to(case.supervoxel)
        if case.case_id in edited_labels:
            label, geometry = read_volume(case.label)
            label = np.where(np.isin(label, edited_labels[case.case_id]), 0, label).astype(label.dtype)
            write_volume(label, geometry, image_dir / case.label.name)
        else:
            (image_dir / case.label.name).symlink_to(case.label)
    return root


@functools.cache
def load_script(relative: str) -> ModuleType:
    """A script of the repository (``test.py``, ``script/launch.py``) as a module, loaded by its path."""
    name = "difd_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_test_script() -> ModuleType:
    """``test.py`` as a module (registers the ``test`` command on the shared Sacred experiment)."""
    return load_script("test.py")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch and OpenCV on one thread inside the block (restored after)."""
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
