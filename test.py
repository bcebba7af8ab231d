"""Evaluation of a trained DIFD model on one fold (spec section 5; protocol of Ouyang et al.).

Examples::

    python test.py with abd_mri setting1 official_script eval_fold=0            # newest snapshot of the run
    python test.py with abd_mri eval_fold=0 reload_model_path=/path/to/40000.pth  # ours or official layout

For each class of ``test_label``: the support volume is the ``supp_idx``-th of the fold, the others are
queries; each query chunk is predicted in one batched forward (:mod:`evaluation`), Dice and IoU are computed
per query volume over its labelled slices and averaged per class. Outputs, in the Sacred run folder
``<path.log_dir>/<exp_str>/fold<k>/test/<id>/``:

* ``results.json``: per class (by name) its label value, Dice and IoU per query case id and their means,
  the query cases without the class (skipped), the mean over classes, the checkpoint and the run's config;
* ``predictions/<CLASS>/pred_<case id>.nii.gz``: the binary prediction of the labelled slices (0
  elsewhere) with the query volume's spacing, origin and direction;
* ``overlays/<CLASS>/case<case id>_z<slice>.png``: the middle labelled slice with the ground-truth (green)
  and predicted (red) outlines.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from sacred.observers import FileStorageObserver

from checkpoint import latest_snapshot, load_model_weights
from config import ex, run_folder
from dataloaders import TestDataset, get_dataset_info
from evaluation import predict_query_volume, save_overlay, save_prediction_nifti
from metrics import dice_iou
from models import build_difd
from runtime import apply_memory_format, check_precision
from utils import resolve_data_root, resolve_device, set_seed


def _output_dir(_run, config: dict[str, Any]) -> Path:
    """The Sacred run folder (``test/<id>``), or ``test/unobserved`` when run with ``-u``."""
    for observer in _run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return Path(observer.dir)
    return run_folder(config) / "test" / "unobserved"


def _results_table(results: dict[str, Any]) -> str:
    """Plain-text table: one row per class (mean Dice and IoU in %, query volumes), then the mean."""
    lines = [f"{'class':<12} {'Dice %':>8} {'IoU %':>8}  queries"]
    for name, entry in results["classes"].items():
        lines.append(
            f"{name:<12} {100 * entry['mean_dice']:8.2f} {100 * entry['mean_iou']:8.2f}  {len(entry['dice'])}"
        )
    lines.append(f"{'mean':<12} {100 * results['mean_dice']:8.2f} {100 * results['mean_iou']:8.2f}")
    return "\n".join(lines)


@ex.main
def test(
    _run,
    _log,
    _config,
    seed: int,
    deterministic: bool,
    device: str,
    data_root: str | None,
    dataset: str,
    eval_fold: int,
    test_label: list[int],
    supp_idx: int,
    n_part: int,
    image_size: int | None,
    reload_model_path: str | None,
    decoder_extra_maps: bool,
    region_sampling: str,
    multi_shot: str,
    precision: str,
    channels_last: bool,
) -> float:
    """Evaluate one fold; returns the mean Dice over the test classes."""
    config = json.loads(json.dumps(_config))
    check_precision(precision)
    torch_device = resolve_device(device)
    set_seed(seed, deterministic)
    info = get_dataset_info(dataset)
    labels = info.validate_labels(test_label, "test_label")
    root = resolve_data_root(data_root)
    checkpoint = (
        Path(reload_model_path) if reload_model_path else latest_snapshot(run_folder(config) / "snapshots")
    )
    if checkpoint is None:
        raise FileNotFoundError(
            f"no snapshot in {run_folder(config) / 'snapshots'} (train this dataset/setting/fold first, "
            "or pass reload_model_path=...)"
        )

    with warnings.catch_warnings():
        # The encoder warns that it is randomly initialised: the checkpoint overwrites every weight.
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        model = build_difd(
            pretrained_weights=None,
            decoder_extra_maps=decoder_extra_maps,
            region_sampling=region_sampling,
            multi_shot=multi_shot,
        )
    load_model_weights(model, checkpoint)
    apply_memory_format(model.to(torch_device), channels_last).eval()
    out_dir = _output_dir(_run, config)
    _log.info(f"checkpoint {checkpoint}; device {torch_device}; outputs in {out_dir}")

    results: dict[str, Any] = {
        "dataset": dataset,
        "eval_fold": eval_fold,
        "supp_idx": supp_idx,
        "n_part": n_part,
        "checkpoint": str(checkpoint),
        "classes": {},
    }
    for label in labels:
        name = info.class_name(label)
        test_set = TestDataset(
            dataset, root, eval_fold, label, supp_idx=supp_idx, n_part=n_part, image_size=image_size
        )
        support = test_set.support()
        entry: dict[str, Any] = {
            "label": label,
            "support_case": support["case_id"],
            "support_slices": support["slice_indices"].tolist(),
            "dice": {},
            "iou": {},
            "skipped": [],
        }
        for query in test_set:
            case_id = query["case_id"]
            if query["labels"].shape[0] == 0:
                _log.warning(f"{name}: query case {case_id} has no {name} voxels; skipped")
                entry["skipped"].append(case_id)
                continue
            pred = predict_query_volume(model, support, query, torch_device, precision)
            gt = query["labels"].numpy()
            dice, iou = dice_iou(pred.numpy(), gt)
            entry["dice"][str(case_id)] = dice
            entry["iou"][str(case_id)] = iou
            save_prediction_nifti(
                pred.numpy(),
                query["slice_indices"].numpy(),
                query["native_shape"],
                query["geometry"],
                out_dir / "predictions" / name / f"pred_{case_id}.nii.gz",
            )
            middle = len(gt) // 2
            z = int(query["slice_indices"][middle])
            save_overlay(
                query["native_image"][z],
                gt[middle],
                pred[middle].numpy(),
                out_dir / "overlays" / name / f"case{case_id}_z{z}.png",
            )
            _log.info(f"{name} case {case_id}: Dice {dice:.4f}, IoU {iou:.4f}")
        if not entry["dice"]:
            raise ValueError(f"{name}: none of the query volumes of fold {eval_fold} contains the class")
        entry["mean_dice"] = sum(entry["dice"].values()) / len(entry["dice"])
        entry["mean_iou"] = sum(entry["iou"].values()) / len(entry["iou"])
        results["classes"][name] = entry
        _run.log_scalar(f"dice_{name}", entry["mean_dice"])
    per_class = list(results["classes"].values())
    results["mean_dice"] = sum(e["mean_dice"] for e in per_class) / len(per_class)
    results["mean_iou"] = sum(e["mean_iou"] for e in per_class) / len(per_class)
    results["config"] = config
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _log.info(f"{dataset} fold {eval_fold}, supp_idx {supp_idx}:\n{_results_table(results)}")
    _log.info(f"wrote {out_dir / 'results.json'}")
    return results["mean_dice"]


if __name__ == "__main__":
    ex.run_commandline()
