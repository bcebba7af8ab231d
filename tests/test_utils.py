"""Seeding, device resolution, data-root precedence and the atomic write (utils.py)."""

from __future__ import annotations

import errno
import random

import numpy as np
import pytest
import torch

import utils
from utils import DATA_ROOT_ENV, resolve_data_root, resolve_device, set_seed


def _draws() -> tuple[float, float, torch.Tensor]:
    # set_seed must also seed NumPy's legacy global state, which third-party code draws from.
    return random.random(), float(np.random.rand()), torch.rand(5)  # noqa: NPY002


def test_set_seed_reproduces_python_numpy_and_torch_draws():
    set_seed(123)
    first = _draws()
    set_seed(123)
    second = _draws()
    assert first[0] == second[0]
    assert first[1] == second[1]
    torch.testing.assert_close(first[2], second[2], rtol=0, atol=0)
    set_seed(124)
    third = _draws()
    assert third[0] != first[0] and third[1] != first[1]
    assert not torch.equal(third[2], first[2])


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_sets_both_cudnn_flags(deterministic):
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        set_seed(0, deterministic=deterministic)
        assert torch.backends.cudnn.deterministic is deterministic
        assert torch.backends.cudnn.benchmark is (not deterministic)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def test_resolve_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_errors():
    with pytest.raises(ValueError, match="expected 'auto'"):
        resolve_device("tpu-of-dreams")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_data_root_precedence(tmp_path, monkeypatch):
    from_config = tmp_path / "config_root"
    from_env = tmp_path / "env_root"
    default = tmp_path / "default_root"
    for path in (from_config, from_env, default):
        path.mkdir()
    monkeypatch.setattr(utils, "DEFAULT_DATA_ROOT", default)

    monkeypatch.setenv(DATA_ROOT_ENV, str(from_env))
    assert resolve_data_root(str(from_config)) == from_config
    assert resolve_data_root(None) == from_env
    assert resolve_data_root("") == from_env

    monkeypatch.delenv(DATA_ROOT_ENV)
    assert resolve_data_root(None) == default


def test_data_root_missing_paths_are_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "DEFAULT_DATA_ROOT", tmp_path / "absent_default")
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_root(None)
    message = str(info.value)
    assert "data_root" in message and DATA_ROOT_ENV in message and "absent_default" in message

    with pytest.raises(FileNotFoundError, match="config key 'data_root'"):
        resolve_data_root(str(tmp_path / "nope"))
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "also_nope"))
    with pytest.raises(FileNotFoundError, match=DATA_ROOT_ENV):
        resolve_data_root(None)


def test_write_atomically_replaces_a_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    assert utils.write_atomically(target, lambda tmp: tmp.write_text("new")) == target
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_write_atomically_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise ValueError("writer broke")

    with pytest.raises(ValueError, match="writer broke"):
        utils.write_atomically(target, half_then_fail)

    def refuse(tmp):
        raise ValueError(f"bad content in {tmp.name}")

    with pytest.raises(ValueError, match="bad content"):
        utils.write_atomically(target, lambda tmp: tmp.write_text("unchecked"), verify=refuse)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_write_atomically_names_what_failed_to_be_written(tmp_path):
    target = tmp_path / "picture.png"

    def disk_full(tmp):
        tmp.write_bytes(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write picture .*picture\.png: No space left") as caught:
        utils.write_atomically(target, disk_full, what="picture")
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_write_atomically_replaces_a_folder(tmp_path):
    target = tmp_path / "overlays"
    target.mkdir()
    (target / "stale.png").write_bytes(b"old")

    def make_folder(tmp):
        tmp.mkdir()
        (tmp / "slice3.png").write_bytes(b"new")

    utils.write_atomically(target, make_folder)
    assert [p.name for p in target.iterdir()] == ["slice3.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlays"]
