"""Fault catalogue (issue 12), data and checkpoint side: every damaged, truncated, non-finite or mismatched
input and every unusable snapshot or checkpoint is refused with the file's (or option's) name, and nothing
half written is left behind; plus the faults that were already handled, so that they stay handled.

Each row of ``FAULTS`` sets a fault up in ``tmp_path`` (real CMR/SABS volumes from the data root, linked or
copied, the damaged ones always copies) and returns an :class:`Expect`: the exception type or exit status,
a pattern the message must match (it names the file or option), and the paths that must not exist
afterwards. Rows that expect success (resume from the newest intact snapshot, stale temporaries) check
their result instead. Checkpoint rows use a tiny model, or the real DIFD module tree on the meta device
with files of expanded one-element tensors (real names and shapes, a few kilobytes).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torchvision
from torch import nn

from data.CHAOST2 import preprocess as chaos
from data.CMR import preprocess as cmr
from data.SABS import preprocess as sabs
from data.supervoxels import compare_published, generate_supervoxels
from dataloaders import TestDataset, TrainDataset, get_dataset_info, list_cases, read_case, read_volume
from dataloaders.cases import dataset_folders
from engine.snapshots import load_resume_snapshot, load_snapshot, save_snapshot
from models import build_difd, load_model_weights
from models.encoder import Res101Encoder
from models.weights import SNAPSHOT_FORMAT, WEIGHTS_FORMAT
from tests.damage import flip_silent_bit, put_voxels, truncate
from tests.raw_fixtures import write_chaos_case
from utils import remove_stale_temporaries

CMR = get_dataset_info("CMR")
TRAIN_CASE = 13  # 11 slices, a training case of fold 0
EVAL_CASE = 2  # a query volume of fold 0 (its support volume is case 1)
QUERY_CASE = 4  # 11 slices, a query of fold 0 (support: case 1)


@dataclass
class Expect:
    """What a fault must give: ``error`` raised (or ``exit_code`` from a command's ``main``) with a message
    matching ``match``; ``absent`` paths must not exist afterwards. ``error=None``: ``run()`` succeeds and
    ``check(result, log)`` holds (``log``: the warnings logged)."""

    run: Callable[[], Any]
    match: str = ""
    error: type[BaseException] | None = ValueError
    exit_code: int | None = None
    absent: list[Path] = field(default_factory=list)
    check: Callable[[Any, str], None] | None = None


@dataclass
class Ctx:
    tmp: Path
    data: Path

    def cmr_root(self) -> Path:
        """A CMR data root of links to the real files (replace a link by a damaged copy with ``own``)."""
        root = self.tmp / "root"
        image_dir, sv_dir = dataset_folders(CMR, root)
        for case in list_cases(CMR, self.data, supervoxels=True):
            pairs = ((case.image, image_dir), (case.label, image_dir), (case.supervoxel, sv_dir))
            for source, folder in pairs:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / source.name).symlink_to(source)
        return root

    @staticmethod
    def own(link: Path) -> Path:
        """Replace the link ``link`` by a copy of its target; returns it."""
        target = link.resolve()
        link.unlink()
        shutil.copyfile(target, link)
        return link

    def image(self, root: Path, kind: str, case_id: int) -> Path:
        image_dir, sv_dir = dataset_folders(CMR, root)
        if kind == "supervoxel":
            return self.own(sv_dir / CMR.supervoxel_pattern.format(id=case_id))
        return self.own(image_dir / f"{kind}_{case_id}.nii.gz")

    def cmr_raw(self) -> tuple[Path, Path, Path]:
        """MS-CMRSeg-style raw input (real case 13 as ``patient13_C0[_manual].nii.gz``): raw dir, image,
        label."""
        raw = self.tmp / "raw_cmr"
        raw.mkdir()
        image_dir, _ = dataset_folders(CMR, self.data)
        image, label = raw / "patient13_C0.nii.gz", raw / "patient13_C0_manual.nii.gz"
        shutil.copyfile(image_dir / "image_13.nii.gz", image)
        shutil.copyfile(image_dir / "label_13.nii.gz", label)
        return raw, image, label

    def sabs_raw(self, suffix: str = ".nii.gz") -> tuple[Path, Path, Path]:
        """Synapse-style raw input from 10 slices of real SABS case 1: raw dir, image, label."""
        raw = self.tmp / "raw_sabs"
        image_dir, _ = dataset_folders("SABS", self.data)
        paths = []
        for kind, folder in (("image", "img"), ("label", "label")):
            source = sitk.ReadImage(str(image_dir / f"{kind}_1.nii.gz"))[:, :, 60:70]
            (raw / folder).mkdir(parents=True)
            paths.append(raw / folder / f"{folder}0001{suffix}")
            sitk.WriteImage(source, str(paths[-1]))
        return raw, paths[0], paths[1]


def _main(command: Callable[[list[str]], Any], argv: list[str]) -> Callable[[], Any]:
    return lambda: command([str(a) for a in argv])


# ----------------------------------------------------------------------------- 1. corrupt compressed files


def crc_image_sitk(ctx: Ctx) -> Expect:
    path = ctx.image(ctx.cmr_root(), "image", TRAIN_CASE)
    size = path.stat().st_size
    flip_silent_bit(path)
    assert path.stat().st_size == size
    return Expect(lambda: read_volume(path, backend="sitk"), r"image_13\.nii\.gz is corrupt \(gzip CRC-32")


def crc_image_nibabel(ctx: Ctx) -> Expect:
    path = ctx.image(ctx.cmr_root(), "image", TRAIN_CASE)
    flip_silent_bit(path)
    return Expect(lambda: read_volume(path, backend="nibabel"), r"image_13\.nii\.gz is corrupt \(gzip CRC")


def crc_supervoxel_training(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    flip_silent_bit(ctx.image(root, "supervoxel", TRAIN_CASE))
    return Expect(
        lambda: TrainDataset("CMR", root, 0, case_ids=[TRAIN_CASE], length=1),
        r"superpix-MIDDLE_13\.nii\.gz is corrupt",
    )


def crc_label_evaluation(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    flip_silent_bit(ctx.image(root, "label", QUERY_CASE))
    return Expect(lambda: list(TestDataset("CMR", root, 0, 1, image_size=32)), r"label_4\.nii\.gz is corrupt")


def crc_image_supervoxel_generation(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    flip_silent_bit(ctx.image(root, "image", TRAIN_CASE))
    argv = ["--dataset", "CMR", "--data-root", root, "--ids", TRAIN_CASE, "--n-sv", 7]
    return Expect(
        _main(generate_supervoxels.main, argv),
        r"image_13\.nii\.gz is corrupt",
        exit_code=2,
        absent=[root / "CMR" / "supervoxels_7"],
    )


def crc_published_supervoxels_compare(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    flip_silent_bit(ctx.image(root, "supervoxel", TRAIN_CASE))
    argv = ["--dataset", "CMR", "--data-root", root, "--ids", TRAIN_CASE]
    return Expect(_main(compare_published.main, argv), r"superpix-MIDDLE_13\.nii\.gz is corrupt", exit_code=2)


def preprocess_raw(
    ctx: Ctx,
    main: Callable[[list[str]], Any],
    raw: Path,
    message: str,
    error: type[BaseException] = ValueError,
) -> Expect:
    """Run a preprocessing command on the raw folder ``raw``: it must fail with ``error`` and ``message``
    and leave no output folder."""
    out = ctx.tmp / "out"
    return Expect(_main(main, ["--input", raw, "--output", out]), message, error=error, absent=[out])


def crc_raw_cmr_image(ctx: Ctx) -> Expect:
    raw, image, _ = ctx.cmr_raw()
    flip_silent_bit(image)
    return preprocess_raw(ctx, cmr.main, raw, r"patient13_C0\.nii\.gz is corrupt")


# ----------------------------------------------------------------------------- 2. raw preprocessing inputs


def truncated_raw_cmr_label(ctx: Ctx) -> Expect:
    raw, _, label = ctx.cmr_raw()
    truncate(label, 0.8)
    return preprocess_raw(ctx, cmr.main, raw, r"patient13_C0_manual\.nii\.gz is truncated")


def truncated_raw_sabs_plain_nii(ctx: Ctx) -> Expect:
    raw, image, _ = ctx.sabs_raw(".nii")
    truncate(image, 0.6)
    return preprocess_raw(ctx, sabs.main, raw, r"img0001\.nii is truncated")


def nan_raw_cmr_image(ctx: Ctx) -> Expect:
    raw, image, _ = ctx.cmr_raw()
    put_voxels(image, {(3, 100, 120): np.nan})
    return preprocess_raw(
        ctx, cmr.main, raw, r"patient13_C0\.nii\.gz: 1 non-finite voxel\(s\).*NaN 1.*index \(3, 100, 120\)"
    )


def nan_raw_sabs_float_label(ctx: Ctx) -> Expect:
    raw, _, label = ctx.sabs_raw()
    put_voxels(label, {(0, 0, 0): np.nan, (9, 200, 7): -np.inf})
    return preprocess_raw(
        ctx, sabs.main, raw, r"label0001\.nii\.gz: 2 non-finite voxel\(s\).*NaN 1, \+Inf 0, -Inf 1"
    )


def truncated_chaos_png(ctx: Ctx) -> Expect:
    t2spir = write_chaos_case(ctx.tmp / "raw")
    truncate(sorted((t2spir / "Ground").glob("*.png"))[2])
    return preprocess_raw(ctx, chaos.main, ctx.tmp / "raw", r"cannot read .*IMG-0004-00003\.png")


def truncated_chaos_dicom(ctx: Ctx) -> Expect:
    t2spir = write_chaos_case(ctx.tmp / "raw")
    truncate(sorted((t2spir / "DICOM_anon").glob("*.dcm"))[1], 0.7)
    return preprocess_raw(ctx, chaos.main, ctx.tmp / "raw", r"IMG-0004-00002\.dcm", error=RuntimeError)


def truncated_volume(ctx: Ctx) -> Expect:
    path = ctx.image(ctx.cmr_root(), "image", TRAIN_CASE)
    truncate(path)
    return Expect(lambda: read_volume(path, backend="sitk"), r"image_13\.nii\.gz is truncated")


# ----------------------------------------------------------------------------- 3. non-finite voxels


def nan_image_sitk(ctx: Ctx) -> Expect:
    path = ctx.image(ctx.cmr_root(), "image", TRAIN_CASE)
    put_voxels(path, {(2, 30, 40): np.nan, (5, 1, 2): np.nan})
    return Expect(
        lambda: read_volume(path, backend="sitk"),
        r"image_13\.nii\.gz: 2 non-finite voxel\(s\) of 720896 \(NaN 2, \+Inf 0, -Inf 0\); the first at "
        r"index \(2, 30, 40\)",
    )


def inf_image_nibabel(ctx: Ctx) -> Expect:
    path = ctx.image(ctx.cmr_root(), "image", TRAIN_CASE)
    put_voxels(path, {(7, 8, 9): np.inf})
    return Expect(
        lambda: read_volume(path, backend="nibabel"),
        r"image_13\.nii\.gz: 1 non-finite voxel\(s\).*\+Inf 1.*index \(7, 8, 9\)",
    )


def inf_query_evaluation(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    put_voxels(ctx.image(root, "image", QUERY_CASE), {(5, 128, 128): -np.inf})
    return Expect(
        lambda: list(TestDataset("CMR", root, 0, 1, image_size=32)),
        r"image_4\.nii\.gz: 1 non-finite voxel\(s\).*-Inf 1",
    )


def nan_float_label_training(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    put_voxels(ctx.image(root, "label", TRAIN_CASE), {(0, 0, 0): np.nan})
    return Expect(
        lambda: TrainDataset("CMR", root, 0, case_ids=[TRAIN_CASE], length=1, use_gt=True),
        r"label_13\.nii\.gz: 1 non-finite voxel",
    )


# ----------------------------------------------------------------------------- already handled: stay so


def garbage_volume(ctx: Ctx) -> Expect:
    path = ctx.image(ctx.cmr_root(), "image", TRAIN_CASE)
    path.write_bytes(b"this is no NIfTI volume" * 30)
    return Expect(lambda: read_volume(path), r"cannot read .*image_13\.nii\.gz")


def missing_partner(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    (dataset_folders(CMR, root)[0] / "label_13.nii.gz").unlink()
    return Expect(lambda: list_cases("CMR", root), r"missing .*label_13\.nii\.gz", error=FileNotFoundError)


def shape_mismatch(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    label = ctx.image(root, "label", TRAIN_CASE)
    image = sitk.ReadImage(str(label))
    sitk.WriteImage(image[:, :200, :], str(label))
    case = next(c for c in list_cases("CMR", root) if c.case_id == TRAIN_CASE)
    return Expect(lambda: read_case(case, "CMR"), r"shape mismatch: .*label_13\.nii\.gz")


def _regeometried(path: Path, **changes: Any) -> None:
    """Rewrite ``path`` with the same voxels and some of spacing, origin, direction changed."""
    image = sitk.ReadImage(str(path))
    for key, value in changes.items():
        getattr(image, f"Set{key.capitalize()}")(value)
    sitk.WriteImage(image, str(path))


def label_other_spacing(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    _regeometried(ctx.image(root, "label", TRAIN_CASE), spacing=(1.3, 1.25, 7.99))
    return Expect(
        lambda: TrainDataset("CMR", root, 0, use_gt=True, case_ids=[TRAIN_CASE]),
        r"geometry mismatch: .*label_13\.nii\.gz has spacing \(1\.3, 1\.25, 7\.99\).*; its image "
        r".*image_13\.nii\.gz has spacing \(1\.25, 1\.25, 7\.99\)",
    )


def label_other_origin_at_evaluation(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    label = ctx.image(root, "label", EVAL_CASE)
    origin = sitk.ReadImage(str(label)).GetOrigin()
    _regeometried(label, origin=(origin[0] + 5.0, *origin[1:]))
    return Expect(
        lambda: TestDataset("CMR", root, 0, 2),
        rf"geometry mismatch: .*label_{EVAL_CASE}\.nii\.gz has .*origin \({origin[0] + 5:.3f}",
    )


def supervoxel_other_geometry(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    _regeometried(
        ctx.image(root, "supervoxel", TRAIN_CASE), spacing=(1.25, 1.25, 7.99), origin=(9.0, 0.0, 0.0)
    )
    return Expect(
        lambda: TrainDataset("CMR", root, 0, case_ids=[TRAIN_CASE]),
        r"geometry mismatch: .*superpix-MIDDLE_13\.nii\.gz has spacing .*origin \(9\.0, 0\.0, 0\.0\).*"
        r"its image .*image_13\.nii\.gz has .*\(supervoxel files may also carry the default geometry",
    )


def supervoxel_default_geometry_accepted(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    published = sitk.ReadImage(
        str(dataset_folders(CMR, ctx.data)[1] / f"superpix-MIDDLE_{TRAIN_CASE}.nii.gz")
    )
    assert published.GetSpacing() == (1.0, 1.0, 1.0) and published.GetOrigin() == (0.0, 0.0, 0.0)

    def check(result: Any, log: str) -> None:
        case = result.volumes[0]
        assert case.case_id == TRAIN_CASE and len(result) == 1

    return Expect(
        lambda: TrainDataset("CMR", root, 0, case_ids=[TRAIN_CASE], length=1), error=None, check=check
    )


def flat_volume(ctx: Ctx) -> Expect:
    path = ctx.image(ctx.cmr_root(), "image", TRAIN_CASE)
    sitk.WriteImage(sitk.ReadImage(str(path))[:, :, 3], str(path))
    return Expect(lambda: read_volume(path), r"image_13\.nii\.gz: expected a scalar 3-D volume")


def unknown_label_values(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    put_voxels(ctx.image(root, "label", TRAIN_CASE), {(0, 0, 0): 7.0})
    case = next(c for c in list_cases("CMR", root) if c.case_id == TRAIN_CASE)
    return Expect(lambda: read_case(case, "CMR"), r"label_13\.nii\.gz: unknown label values \[7\]")


def unknown_dataset(ctx: Ctx) -> Expect:
    return Expect(lambda: TrainDataset("ABD", ctx.data, 0), r"unknown dataset 'ABD'")


def missing_supervoxel_folder(ctx: Ctx) -> Expect:
    return Expect(
        lambda: list_cases("CMR", ctx.data, supervoxels=True, n_sv=7),
        r"supervoxels_7 \(make it with data/supervoxels/generate_supervoxels\.py",
        error=FileNotFoundError,
    )


# ----------------------------------------------------------------------------- 9. options before side effects


def _generate(ctx: Ctx, *extra: Any) -> tuple[Callable[[], Any], Path]:
    root = ctx.cmr_root()
    argv = ["--dataset", "CMR", "--data-root", root, "--n-sv", 7, *extra]
    return _main(generate_supervoxels.main, argv), root / "CMR" / "supervoxels_7"


def generate_jobs_zero(ctx: Ctx) -> Expect:
    run, folder = _generate(ctx, "--jobs", 0)
    return Expect(run, r"--jobs: expected a positive integer, got 0", exit_code=2, absent=[folder])


def generate_out_is_a_file(ctx: Ctx) -> Expect:
    (ctx.tmp / "notes.txt").write_text("x")
    run, folder = _generate(ctx, "--out", ctx.tmp / "notes.txt" / "sv")
    return Expect(run, r"--out: expected a folder, but .*notes\.txt is a file", exit_code=2, absent=[folder])


def generate_bad_n_sv(ctx: Ctx) -> Expect:
    root = ctx.cmr_root()
    argv = ["--dataset", "CMR", "--data-root", root, "--n-sv", 0]
    return Expect(
        _main(generate_supervoxels.main, argv),
        r"--n-sv: expected a positive integer, got 0",
        exit_code=2,
        absent=[root / "CMR" / "supervoxels_0"],
    )


def generate_unknown_ids(ctx: Ctx) -> Expect:
    run, folder = _generate(ctx, "--ids", 99)
    return Expect(run, r"--ids: no image for case id\(s\) \[99\]", exit_code=2, absent=[folder])


def generate_unknown_dataset(ctx: Ctx) -> Expect:
    argv = ["--dataset", "ABD", "--data-root", ctx.tmp]
    return Expect(_main(generate_supervoxels.main, argv), r"--dataset: unknown dataset 'ABD'", exit_code=2)


# ----------------------------------------------------------------------------- 6/7. snapshots


def _tiny_run() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2], gamma=0.5)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


def _snapshots(folder: Path, steps: tuple[int, ...], n_steps: int = 10) -> None:
    model, optimizer, scheduler = _tiny_run()
    for step in steps:
        save_snapshot(
            folder / f"{step}.pth",
            step=step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            config={"n_steps": n_steps},
            final=step == n_steps,
        )


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside a tensor record of a torch zip file (the zip index stays intact)."""
    data = bytearray(path.read_bytes())
    offset = data.index(b"data/0") + 200
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def resume_skips_truncated_newest(ctx: Ctx) -> Expect:
    folder = ctx.tmp / "snapshots"
    _snapshots(folder, (1, 2, 3))
    truncate(folder / "3.pth")

    def check(result: Any, log: str) -> None:
        path, payload = result
        assert path.name == "2.pth" and payload["step"] == 2 and "optimizer" in payload
        assert re.search(r"skipping .*3\.pth: cannot read snapshot .*3\.pth: the file is truncated", log)

    return Expect(lambda: load_resume_snapshot(folder, logging.getLogger("faults")), error=None, check=check)


def resume_skips_damaged_newest(ctx: Ctx) -> Expect:
    folder = ctx.tmp / "snapshots"
    _snapshots(folder, (1, 2, 3))
    _flip_tensor_byte(folder / "3.pth")

    def check(result: Any, log: str) -> None:
        assert result[0].name == "2.pth"
        assert re.search(r"3\.pth: the file is damaged \(Bad CRC-32", log)

    return Expect(lambda: load_resume_snapshot(folder, logging.getLogger("faults")), error=None, check=check)


def resume_nothing_intact(ctx: Ctx) -> Expect:
    folder = ctx.tmp / "snapshots"
    _snapshots(folder, (1, 2, 3))
    truncate(folder / "3.pth")
    _flip_tensor_byte(folder / "2.pth")
    return Expect(
        lambda: load_resume_snapshot(folder),
        r"no snapshot in .*can be resumed \(3\.pth: .*truncated; 2\.pth: .*damaged.*; "
        r"1\.pth: model weights only",
    )


def resume_from_weights_only(ctx: Ctx) -> Expect:
    folder = ctx.tmp / "snapshots"
    _snapshots(folder, (1, 2, 3))
    return Expect(lambda: load_snapshot(folder / "1.pth"), r"1\.pth holds the model weights only")


def finished_run_keeps_one_resume_state(ctx: Ctx) -> Expect:
    folder = ctx.tmp / "snapshots"
    _snapshots(folder, (3, 6, 9, 10), n_steps=10)

    def check(result: Any, log: str) -> None:
        kinds = {p.name: torch.load(p, weights_only=True)["format"] for p in folder.iterdir()}
        assert kinds == {
            "3.pth": WEIGHTS_FORMAT,
            "6.pth": WEIGHTS_FORMAT,
            "9.pth": SNAPSHOT_FORMAT,
            "10.pth": WEIGHTS_FORMAT,
        }
        assert result[0].name == "10.pth"  # finished: nothing to resume, the final weights are returned

    return Expect(lambda: load_resume_snapshot(folder), error=None, check=check)


def disk_full_while_saving(ctx: Ctx) -> Expect:
    folder = ctx.tmp / "snapshots"
    _snapshots(folder, (1, 2))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model, optimizer, scheduler = _tiny_run()

    def full_disk(obj: Any, stream: Any, **kwargs: Any) -> None:
        stream.write(b"PK\x03\x04 half a snapshot")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def run() -> None:
        original, torch.save = torch.save, full_disk
        try:
            save_snapshot(
                folder / "3.pth", step=3, model=model, optimizer=optimizer, scheduler=scheduler, config={}
            )
        finally:
            torch.save = original
            assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing touched

    return Expect(
        run,
        r"cannot write snapshot .*3\.pth: No space left on device",
        error=OSError,
        absent=[folder / "3.pth", folder / f".3.pth.tmp{os.getpid()}"],
    )


def damaged_old_snapshot_at_save(ctx: Ctx) -> Expect:
    folder = ctx.tmp / "snapshots"
    _snapshots(folder, (1, 2))
    _flip_tensor_byte(folder / "1.pth")

    def check(result: Any, log: str) -> None:
        assert re.search(r"keep policy: .*1\.pth left as it is: .*1\.pth: the file is damaged", log)
        assert load_snapshot(folder / "2.pth")["step"] == 2 and load_snapshot(folder / "3.pth")["step"] == 3

    return Expect(lambda: _snapshots(folder, (3,)), error=None, check=check)


def stale_temporaries(ctx: Ctx) -> Expect:
    folder = ctx.tmp / "snapshots"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    (folder / f".20.pth.tmp{dead_pid}").write_bytes(b"half")
    (folder / f".30.pth.tmp{live_pid}").write_bytes(b"being written")

    def check(result: Any, log: str) -> None:
        assert [p.name for p in result] == [f".20.pth.tmp{dead_pid}"]
        assert sorted(p.name for p in folder.iterdir()) == [f".30.pth.tmp{live_pid}"]
        assert f"left by process {dead_pid} that died while writing 20.pth" in log

    return Expect(
        lambda: remove_stale_temporaries(folder, logging.getLogger("faults")), error=None, check=check
    )


# ----------------------------------------------------------------------------- 6/8/11. model checkpoints


def _meta_difd(extra_maps: bool = False) -> nn.Module:
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", UserWarning)
        return build_difd(decoder_extra_maps=extra_maps)


def _expanded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real names and shapes, one stored element per tensor (kilobytes on disk)."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state.items()}


def _official_state(extra_maps: bool) -> dict[str, torch.Tensor]:
    state = _expanded(_meta_difd(extra_maps).state_dict())
    state["criterion.weight"] = torch.tensor([0.1, 1.0])
    return state


def _torchvision_state(deeplab: bool) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        trunk = torchvision.models.resnet101(weights=None).state_dict()
    if not deeplab:
        return _expanded(trunk)
    state = {f"backbone.{k}": v for k, v in trunk.items() if not k.startswith("fc.")}
    state["classifier.0.convs.0.0.weight"] = torch.empty(256, 2048, 1, 1)
    state["classifier.4.weight"] = torch.empty(21, 256, 1, 1)
    return _expanded(state)


def truncated_reload_model(ctx: Ctx) -> Expect:
    path = ctx.tmp / "model.pth"
    torch.save(_official_state(False), path)
    truncate(path)
    return Expect(
        lambda: load_model_weights(_meta_difd(), path),
        r"cannot read model checkpoint .*model\.pth: the file is truncated",
    )


def damaged_reload_model(ctx: Ctx) -> Expect:
    path = ctx.tmp / "model.pth"
    torch.save(_official_state(False), path)
    _flip_tensor_byte(path)
    return Expect(lambda: load_model_weights(_meta_difd(), path), r"model\.pth: the file is damaged")


def truncated_pretrained(ctx: Ctx) -> Expect:
    path = ctx.tmp / "resnet101-63fe2227.pth"
    torch.save(_torchvision_state(deeplab=False), path)
    truncate(path, 0.9)

    def run() -> None:
        with torch.device("meta"):
            Res101Encoder("resnet101", path)

    return Expect(run, r"cannot read pretrained checkpoint \(.resnet101.\) .*63fe2227\.pth: .*truncated")


def torchvision_resnet_as_model(ctx: Ctx) -> Expect:
    path = ctx.tmp / "resnet101-63fe2227.pth"
    torch.save(_torchvision_state(deeplab=False), path)
    return Expect(
        lambda: load_model_weights(_meta_difd(), path),
        r"resnet101-63fe2227\.pth into the model: the file seems to be a torchvision ResNet-101 \(ImageNet\) "
        r"checkpoint.*pretrained_weights='resnet101'.*; 0 of the model's 643 tensors match it; 643 of the "
        r"model's tensors are not in the file: .*\(639 more\); 626 of the file's",
    )


def deeplab_as_model(ctx: Ctx) -> Expect:
    path = ctx.tmp / "deeplabv3.pth"
    torch.save(_torchvision_state(deeplab=True), path)
    return Expect(
        lambda: load_model_weights(_meta_difd(), path),
        r"deeplabv3\.pth into the model: the file seems to be a torchvision DeepLabV3-ResNet101",
    )


def official_2c3_into_default_model(ctx: Ctx) -> Expect:
    path = ctx.tmp / "official.pth"
    torch.save(_official_state(extra_maps=True), path)
    return Expect(
        lambda: load_model_weights(_meta_difd(False), path),
        r"official layout with 2C\+3 \(1027-channel\) decoders; 641 of the model's 643 tensors match it; "
        r"2 shape\(s\) differ: decoder1\.merge\.0\.weight \(512, 1027, 1, 1\) in the file, "
        r"\(512, 1025, 1, 1\) here.*hint: .*decoder_extra_maps=True$",
    )


def official_2c1_into_extra_maps_model(ctx: Ctx) -> Expect:
    path = ctx.tmp / "official.pth"
    torch.save(_official_state(extra_maps=False), path)
    return Expect(
        lambda: load_model_weights(_meta_difd(True), path),
        r"2C\+1 \(1025-channel\).*decoder_extra_maps=False$",
    )


def unrelated_architecture(ctx: Ctx) -> Expect:
    path = ctx.tmp / "other.pth"
    state = _official_state(extra_maps=True)
    state = {k.replace("encoder.", "net."): v for k, v in state.items()}  # another encoder, extra maps too
    torch.save(state, path)

    def run() -> None:
        with pytest.raises(ValueError) as info:
            load_model_weights(_meta_difd(True), path)
        message = str(info.value)
        assert "hint" not in message and len(message) < 1500, message  # no wrong hint, no 26 KB of names
        raise info.value

    return Expect(run, r"other\.pth into the model: the file seems to be a state dict of another architect")


def snapshot_with_other_decoders(ctx: Ctx) -> Expect:
    folder = ctx.tmp / "snapshots"
    model = _meta_difd(extra_maps=True)
    state = _expanded(model.state_dict())
    payload = {"format": WEIGHTS_FORMAT, "step": 5, "model": state}
    payload["config"] = {"dataset": "CMR", "decoder_extra_maps": True}
    folder.mkdir()
    torch.save(payload, folder / "5.pth")
    return Expect(
        lambda: load_model_weights(_meta_difd(False), folder / "5.pth"),
        r"weights-only snapshot of this project \(step 5, dataset CMR, decoder_extra_maps=True\).*"
        r"hint: .*decoder_extra_maps=True$",
    )


def official_criterion_weight_checked(ctx: Ctx) -> Expect:
    path = ctx.tmp / "official.pth"
    state = _official_state(extra_maps=False)
    state["criterion.weight"] = torch.tensor([0.5, 1.0])
    torch.save(state, path)
    return Expect(
        lambda: load_model_weights(_meta_difd(), path),
        r"official\.pth: criterion\.weight .* is \[0\.5, 1\.0\], expected \[0\.1, 1\.0\]",
    )


def official_criterion_weight_accepted(ctx: Ctx) -> Expect:
    path = ctx.tmp / "official.pth"
    torch.save(_official_state(extra_maps=False), path)

    def check(result: Any, log: str) -> None:
        assert result.kind == "state_dict" and result.dropped == ["criterion.weight"]

    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # copying into meta tensors is a no-op
            return load_model_weights(_meta_difd(), path)

    return Expect(run, error=None, check=check)


FAULTS = [
    crc_image_sitk,
    crc_image_nibabel,
    crc_supervoxel_training,
    crc_label_evaluation,
    crc_image_supervoxel_generation,
    crc_published_supervoxels_compare,
    crc_raw_cmr_image,
    truncated_raw_cmr_label,
    truncated_raw_sabs_plain_nii,
    nan_raw_cmr_image,
    nan_raw_sabs_float_label,
    truncated_chaos_png,
    truncated_chaos_dicom,
    truncated_volume,
    nan_image_sitk,
    inf_image_nibabel,
    inf_query_evaluation,
    nan_float_label_training,
    garbage_volume,
    missing_partner,
    shape_mismatch,
    label_other_spacing,
    label_other_origin_at_evaluation,
    supervoxel_other_geometry,
    supervoxel_default_geometry_accepted,
    flat_volume,
    unknown_label_values,
    unknown_dataset,
    missing_supervoxel_folder,
    generate_jobs_zero,
    generate_out_is_a_file,
    generate_bad_n_sv,
    generate_unknown_ids,
    generate_unknown_dataset,
    resume_skips_truncated_newest,
    resume_skips_damaged_newest,
    resume_nothing_intact,
    resume_from_weights_only,
    finished_run_keeps_one_resume_state,
    disk_full_while_saving,
    damaged_old_snapshot_at_save,
    stale_temporaries,
    truncated_reload_model,
    damaged_reload_model,
    truncated_pretrained,
    torchvision_resnet_as_model,
    deeplab_as_model,
    official_2c3_into_default_model,
    official_2c1_into_extra_maps_model,
    unrelated_architecture,
    snapshot_with_other_decoders,
    official_criterion_weight_checked,
    official_criterion_weight_accepted,
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__ for f in FAULTS])
def test_fault(fault, data_root: Path, tmp_path: Path, capsys, caplog) -> None:
    expect = fault(Ctx(tmp_path, data_root))
    with caplog.at_level(logging.WARNING):
        if expect.error is None:
            expect.check(expect.run(), caplog.text)
        elif expect.exit_code is not None:
            with pytest.raises(SystemExit) as info:
                expect.run()
            assert info.value.code == expect.exit_code
            assert re.search(expect.match, capsys.readouterr().err), expect.match
        else:
            with pytest.raises(expect.error) as info:
                expect.run()
            assert re.search(expect.match, str(info.value)), (expect.match, str(info.value))
    for path in expect.absent:
        assert not path.exists(), f"left behind: {path}"
