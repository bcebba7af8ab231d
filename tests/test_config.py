"""The Sacred config: named configs, unknown keys, every key read, failures before training."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


class TestConfig:
    """The Sacred config: named configs, unknown keys, every key read, failures before training."""

    @staticmethod
    def _config(named=(), **updates):
        from config import ex

        return ex.run("print_run_root", named_configs=list(named), config_updates=updates).config

    def test_named_configs(self):
        assert self._config()["test_label"] == [1, 2, 3, 4] and self._config()["exclude_label"] is None
        ct = self._config(["abd_ct", "setting2"])
        assert (
            ct["dataset"] == "SABS"
            and ct["test_label"] == [1, 2, 3, 6]
            and ct["exclude_label"] == [1, 2, 3, 6]
        )
        assert ct["exp_str"] == "SABS_setting2"
        assert self._config(["cmr"])["n_sv"] == 1000
        official = self._config(["abd_mri", "official_script"])
        assert (official["seed"], official["lr_step_gamma"], official["n_steps"]) == (2025, 0.9, 40000)
        assert (official["save_snapshot_every"], official["max_iters_per_load"], official["supp_idx"]) == (
            10000,
            10000,
            2,
        )
        debug = self._config(["debug"])
        assert debug["pretrained_weights"] is None and debug["num_workers"] == 0 and debug["image_size"] == 64

    @pytest.mark.parametrize(
        "updates", [{"lrr": 0.1}, {"path": {"log_dri": "x"}}, {"optim": {"learning_rate": 1}}]
    )
    def test_mistyped_key_fails(self, updates):
        with pytest.raises(ValueError, match="unknown config key"):
            self._config(**updates)

    def test_every_key_is_read(self):
        """Each top-level key is read as ``cfg["key"]`` (or is a function parameter) in train.py, test.py or
        config/ (run folders, file checks, print_run_root), the value check not counted; each method's own
        keys are read as ``options["key"]`` in the module that builds the method."""
        import inspect

        from config import base_config_keys
        from models import get_method, method_names

        def subscripts(source: str) -> set[str]:
            tree = ast.parse(source)
            found = {
                arg.arg
                for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef)
                for arg in node.args.args
            }
            return found | {
                n.slice.value
                for n in ast.walk(tree)
                if isinstance(n, ast.Subscript)
                and isinstance(n.slice, ast.Constant)
                and isinstance(n.slice.value, str)
            }

        read = {"n_way"}  # the official key whose only use is the check that it is 1 (the methods are 1-way)
        for script in ("train.py", "test.py", "config/experiment.py", "config/values.py"):
            source = (REPO / script).read_text()
            if script == "config/values.py":  # check_values reads every key: only what is outside it counts
                start = source.index("def check_values(")
                source = source[:start] + source[source.index("\ndef ", start + 1) :]
            read |= subscripts(source)
        top_level = {key.split(".")[0] for key in base_config_keys()}
        assert top_level - read == set()
        assert {
            "validate_every",
            "validate_cases",
            "validate_labels",
            "allow_cross_eval",
            "method",
        } <= top_level
        for name in method_names():
            method = get_method(name)
            source = Path(inspect.getsourcefile(method.build)).read_text()
            assert set(method.options) - subscripts(source) == set(), name

    def test_failures_before_training(self, tmp_path):
        import train  # registers the 'train' command on the shared experiment

        common = {"path": {"log_dir": str(tmp_path)}, "data_root": str(tmp_path / "no_data")}
        with pytest.raises(FileNotFoundError, match="pretrained checkpoint.*deeplabv3_resnet101_coco"):
            train.ex.run(
                "train",
                named_configs=["debug"],
                config_updates={**common, "pretrained_weights": "deeplabv3", "pretrained_path": None},
            )
        with pytest.raises(FileNotFoundError, match="pretrained checkpoint"):
            train.ex.run(
                "train",
                named_configs=["debug"],
                config_updates={
                    **common,
                    "pretrained_weights": "resnet101",
                    "pretrained_path": str(tmp_path / "x"),
                },
            )
        with pytest.raises(FileNotFoundError, match="data_root"):
            train.ex.run("train", named_configs=["debug"], config_updates=common)
        with pytest.raises(ValueError, match="setting2"):
            train.ex.run("train", named_configs=["debug"], config_updates={**common, "exclude_label": [1]})
        with pytest.raises(ValueError, match="mode='test'"):
            train.ex.run("train", named_configs=["debug"], config_updates={**common, "mode": "test"})
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "no run folder before the checks pass"

    def test_defaults_of_the_validation_keys(self):
        base, official, debug = self._config(), self._config(["official_script"]), self._config(["debug"])
        assert (base["validate_every"], base["validate_cases"], base["validate_labels"]) == (0, 2, None)
        assert official["validate_every"] == 2000 and debug["validate_every"] == 0
        assert base["allow_cross_eval"] is False

    def test_defaults_of_the_label_free_validation(self):
        base, debug = self._config(), self._config(["debug"])
        assert base["label_free_episodes"] == 40 and debug["label_free_episodes"] == 40
        with pytest.raises(ValueError, match="validate_cases: expected None or an int >= 0, got -1"):
            self._config(validate_cases=-1)


def test_resume_refuses_every_key_but_the_listed_ones():
    from config import RESUME_MAY_DIFFER, config_keys, resume_differences

    saved = {"seed": 1, "n_steps": 10, "device": "cpu", "validate_every": 0, "new_key": 3}
    now = {"seed": 1, "n_steps": 20, "device": "cuda", "validate_every": 5, "new_key": 4}
    assert resume_differences(saved, now) == {"n_steps": (10, 20), "new_key": (3, 4)}
    # keys of snapshots written before the speed switches existed count as the faithful values
    assert resume_differences({}, {"precision": "fp32", "sgd_impl": None}) == {}
    assert resume_differences({}, {"precision": "bf16"}) == {"precision": ("fp32", "bf16")}
    # a snapshot written before methods were plug-ins is DIFD's
    assert resume_differences({}, {"method": "difd"}) == {}
    top_level = {key.split(".")[0] for key in config_keys("difd")}
    assert set(RESUME_MAY_DIFFER) <= top_level
    protected = {"seed", "optim", "loss_weights", "n_steps", "precision", "image_size", "method"}
    assert protected | {"decoder_extra_maps"} <= top_level - set(RESUME_MAY_DIFFER)
