"""Shared pytest set-up: opt-in slow tests, CUDA tests skipped without a GPU, the real-data fixture and one
torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import pytest
import torch

from config import WEIGHTS_MIRROR_ENV
from dataloaders import TestDataset
from tests.run_fixtures import make_mini_root, one_thread
from utils import resolve_data_root

# No OpenCV thread pool in a pytest process, whatever a test forgets (tests.run_fixtures): a process
# forked from it (DataLoader workers, tests/kill_points.py) would wait forever in cv2.setNumThreads on the
# copied pool. pytest-xdist workers run many files, so one test's pool would otherwise reach another's fork.
cv2.setNumThreads(1)

# Hermetic tests: a train.py that misses its pretrained file tries this (absent) folder, never the internet.
os.environ[WEIGHTS_MIRROR_ENV] = (Path(__file__).resolve().parent / "no_weights_mirror").as_uri()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The CUDA paths (tests/test_cuda.py, script/gpu_check.sh) skip, with their reason, without a GPU.
    if not torch.cuda.is_available():
        skip_cuda = pytest.mark.skip(reason=f"needs CUDA: torch {torch.__version__} sees no GPU here")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)
    # Exhaustive checks (e.g. all 55 published supervoxel volumes) run only when asked for.
    if os.environ.get("DIFD_SLOW_TESTS") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow check: set DIFD_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real preprocessed data (``../shared/data`` beside the checkout, or ``$DIFD_DATA_ROOT``)."""
    try:
        return resolve_data_root()
    except FileNotFoundError as err:
        pytest.skip(f"real data not available: {err}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small tensors (``pytestmark = pytest.mark.usefixtures(...)``):
    measured fastest here; several threads only spin on the shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rk_sets(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TestDataset, TestDataset]:
    """RK of fold 1 of the mini root (:func:`tests.run_fixtures.make_mini_root`) at 32 px: read on demand,
    and preloaded."""
    root = make_mini_root(data_root, tmp_path_factory.mktemp("mini_validation"))
    with one_thread():
        return (
            TestDataset("CHAOST2", root, 1, 2, image_size=32),
            TestDataset("CHAOST2", root, 1, 2, image_size=32, n_queries=1, preload=True),
        )
