"""Evaluation of a trained model of any method on one fold (method.md §5; protocol of Ouyang et al.).

Examples::

    python test.py with abd_mri setting1 official_script eval_fold=0            # newest snapshot of the run
    python test.py with abd_mri eval_fold=0 reload_model_path=/path/to/40000.pth  # ours or official layout
    python test.py with abd_mri method=qnet eval_fold=0 reload_model_path=qnet.pth  # an official Q-Net file

For each class of ``test_label``: the support volume is the ``supp_idx``-th of the fold, the others are
queries; each query chunk is predicted in one batched forward, Dice and IoU are computed per query volume
over its labelled slices and averaged per class (:func:`engine.evaluation.evaluate_class`, the code path the
validation during training uses too). This script adds the saved outputs, in the Sacred run folder
``<path.log_dir>/<exp_str>/fold<k>/test/<id>/``:

* ``results.json``: per class (by name) its label value, Dice and IoU per query case id and their means,
  the query cases without the class (skipped), the mean over classes, the checkpoint, the config the
  checkpoint records (``checkpoint_config``; None for a plain state_dict such as an official checkpoint),
  the keys in which it differs from this evaluation (``cross_evaluation``) and the run's config;
* ``predictions/<CLASS>/pred_<case id>.nii.gz``: the binary prediction of the labelled slices (0
  elsewhere) with the query volume's spacing, origin and direction;
* ``overlays/<CLASS>/case<case id>_z<slice>.png``: the middle labelled slice with the ground-truth (green)
  and predicted (red) outlines.

Before anything is evaluated (config hook, then here): the checkpoint must have been trained with the same
``dataset``, ``eval_fold``, ``setting`` and ``image_size`` (``allow_cross_eval=True`` allows a deliberate
cross-evaluation), and every test class must be in the support volume and in at least one query volume. A
run that fails part-way removes the predictions and overlays it wrote and writes no results.json (a full
disk ends it with one line naming the file, the folder's free space and what the file needs); one killed
(SIGKILL) leaves a run folder without results.json, Sacred status RUNNING, which ``script/summarize.py``
flags, and the next evaluation removes the temporaries it left.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from config import cross_evaluation, evaluated_checkpoint, ex, output_dir
from config.experiment import run_commandline
from dataloaders import TestDataset, get_dataset_info
from dataloaders.test_dataset import check_fold_classes
from engine.evaluation import evaluate_class, save_overlay, save_prediction_nifti
from engine.observer import remove_stale_run_temporaries
from engine.runtime import apply_memory_format, warn_emulated_bf16
from models import get_method, load_model, read_model_checkpoint
from utils import disk_full, resolve_data_root, resolve_device, set_seed, write_atomically

#: Subfolders of the run folder that hold per-volume outputs (removed again when the run fails).
OUTPUT_FOLDERS = ("predictions", "overlays")
NO_CONFIG_NOTE = "the checkpoint records no config (a plain state_dict, e.g. an official checkpoint)"


def _results_table(results: dict[str, Any]) -> str:
    """Plain-text table: one row per class (mean Dice and IoU in %, query volumes), then the mean."""
    lines = [f"{'class':<12} {'Dice %':>8} {'IoU %':>8}  queries"]
    for name, entry in results["classes"].items():
        lines.append(
            f"{name:<12} {100 * entry['mean_dice']:8.2f} {100 * entry['mean_iou']:8.2f}  {len(entry['dice'])}"
        )
    lines.append(f"{'mean':<12} {100 * results['mean_dice']:8.2f} {100 * results['mean_iou']:8.2f}")
    return "\n".join(lines)


def _save_outputs(out_dir: Path, name: str, _log):
    """The per-query callback of :func:`engine.evaluation.evaluate_class`: NIfTI prediction, overlay, log
    line."""

    def save(query: dict[str, Any], pred: torch.Tensor, dice: float, iou: float) -> None:
        case_id = query["case_id"]
        save_prediction_nifti(
            pred.numpy(),
            query["slice_indices"].numpy(),
            query["native_shape"],
            query["geometry"],
            out_dir / "predictions" / name / f"pred_{case_id}.nii.gz",
        )
        middle = len(pred) // 2
        z = int(query["slice_indices"][middle])
        save_overlay(
            query["native_image"][z],
            query["labels"][middle].numpy(),
            pred[middle].numpy(),
            out_dir / "overlays" / name / f"case{case_id}_z{z}.png",
        )
        _log.info(f"{name} case {case_id}: Dice {dice:.4f}, IoU {iou:.4f}")

    return save


@ex.main
def test(_run, _log, _config) -> float:
    """Evaluate one fold; returns the mean Dice over the test classes."""
    cfg = json.loads(json.dumps(_config))
    torch_device = resolve_device(cfg["device"])
    warn_emulated_bf16(cfg["precision"], torch_device, _log)
    set_seed(cfg["seed"], cfg["deterministic"])
    info = get_dataset_info(cfg["dataset"])
    labels = info.validate_labels(cfg["test_label"], "test_label")
    root = resolve_data_root(cfg["data_root"])
    checkpoint = evaluated_checkpoint(cfg)
    weights = read_model_checkpoint(checkpoint)  # verified and read once: its config, then its weights
    checkpoint_config = weights.config
    crossed = cross_evaluation(checkpoint_config, cfg)
    if crossed:
        _log.warning(f"cross-evaluation (allow_cross_eval=True): {crossed}")
    check_fold_classes(info, root, cfg["eval_fold"], labels, cfg["supp_idx"])

    # The method the config names: a snapshot of another method, or another method's weights, is refused.
    model, _ = load_model(weights, cfg["method"], get_method(cfg["method"]).options_of(cfg))
    apply_memory_format(model.to(torch_device), cfg["channels_last"]).eval()
    out_dir = output_dir(_run, cfg, "test")
    remove_stale_run_temporaries(out_dir.parent, _log)  # left by evaluations killed while writing
    _log.info(f"checkpoint {checkpoint}; device {torch_device}; outputs in {out_dir}")

    results: dict[str, Any] = {
        "method": cfg["method"],
        "dataset": cfg["dataset"],
        "eval_fold": cfg["eval_fold"],
        "supp_idx": cfg["supp_idx"],
        "n_part": cfg["n_part"],
        "checkpoint": str(checkpoint),
        "checkpoint_config": checkpoint_config,
        "cross_evaluation": crossed,
        "classes": {},
    }
    if checkpoint_config is None:
        results["checkpoint_config_note"] = NO_CONFIG_NOTE
    try:
        for label in labels:
            name = info.class_name(label)
            test_set = TestDataset(
                info, root, cfg["eval_fold"], label, cfg["supp_idx"], cfg["n_part"], cfg["image_size"]
            )
            entry = evaluate_class(
                model, test_set, torch_device, cfg["precision"], on_query=_save_outputs(out_dir, name, _log)
            )
            for case_id in entry["skipped"]:
                _log.warning(f"{name}: query case {case_id} has no {name} voxels; skipped")
            results["classes"][name] = entry
            _run.log_scalar(f"dice_{name}", entry["mean_dice"])
        per_class = list(results["classes"].values())
        results["mean_dice"] = sum(e["mean_dice"] for e in per_class) / len(per_class)
        results["mean_iou"] = sum(e["mean_iou"] for e in per_class) / len(per_class)
        results["config"] = cfg
        out_dir.mkdir(parents=True, exist_ok=True)
        # Last: a run folder holding results.json is a finished evaluation.
        write_atomically(out_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    except BaseException as err:
        for folder in OUTPUT_FOLDERS:
            shutil.rmtree(out_dir / folder, ignore_errors=True)
        if full := disk_full(err):
            raise SystemExit(f"test.py: {full}") from err
        raise
    table = _results_table(results)
    _log.info(f"{cfg['dataset']} fold {cfg['eval_fold']}, supp_idx {cfg['supp_idx']}:\n{table}")
    _log.info(f"wrote {out_dir / 'results.json'}")
    return results["mean_dice"]


if __name__ == "__main__":
    # SIGTERM (a scheduler or the grid's job stopping the evaluation) ends it as Ctrl-C does: the outputs
    # written so far are removed and Sacred records the run as INTERRUPTED.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run_commandline("test.py")
