"""Steps shared by the three preprocessing commands (method.md §1b, Ouyang et al.'s published pipeline).

Every function takes and returns ``SimpleITK.Image`` objects so that geometry (spacing, origin, direction)
travels with the voxels; arrays taken from them are ``(Z, H, W)`` = ``(z, y, x)``, slice axis first, while
sizes, spacings and indices passed to SimpleITK are ``(x, y, z)``.

Shared steps, in the order the commands apply them:

* :func:`clip_top_percentile` - clip intensities above the 99.5th percentile (MR);
* :func:`resample_image` / :func:`resample_label` - linear resampling to a new spacing with the published
  size rule ``int(old_size * old_spacing / new_spacing + 1)``; labels one value at a time as float masks,
  rounded, later values overwriting earlier ones;
* :func:`centre_crop_or_pad` - in-plane crop/pad to 256 x 256 around the array centre (image padded with its
  minimum, labels with 0); :func:`crop_or_pad_inplane` is the general form (SABS border cut);
* :func:`mr_image_steps` / :func:`mr_label_steps` - the MR steps 3-5 above in one call (CHAOS and CMR);
* :func:`write_case` - ``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` in the loaders' folder.

The inference presets (:mod:`inference.presets`) run the same steps on a user's scan, resampling in-plane
only (:func:`inplane_grid`: the scan keeps its slices, which the 2-D model segments one by one).

Plus the command's body every command runs (:func:`run_command`: its command line, the case selection and
the writing), the pieces it is made of (:func:`build_parser`, :func:`select_ids`), :func:`require_dir` and
:func:`check_label_values`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataloaders.datasets import get_dataset_info
from dataloaders.volume import require_simpleitk

sitk = require_simpleitk("data preprocessing (data/preprocessing.py)")

#: Intensities above this percentile of the volume are clipped (MR datasets).
CLIP_PERCENTILE = 99.5
#: In-plane size of CHAOST2 and CMR slices after the centre crop/pad.
CROP_SIZE = (256, 256)


def require_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a ``Path``; FileNotFoundError naming ``what`` was expected if it is no folder."""
    path = Path(path)
    if not path.is_dir():
        found = "a file" if path.exists() else "nothing"
        raise FileNotFoundError(f"{what}: expected a folder at {path}, found {found}")
    return path


def build_parser(description: str, input_help: str) -> argparse.ArgumentParser:
    """Command line shared by the three commands: ``--input DIR --output DIR [--ids N ...]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", required=True, type=Path, help=input_help)
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="dataset folder of the data root (e.g. <data_root>/CHAOST2); the normalised folder goes inside",
    )
    parser.add_argument(
        "--ids",
        type=int,
        nargs="+",
        default=None,
        help="output case ids to process (default: all cases found)",
    )
    return parser


def select_ids(available: Iterable[int], requested: Sequence[int] | None, source: Path) -> list[int]:
    """Sorted case ids to process: all of ``available``, or ``requested`` after checking each exists.

    Raises:
        FileNotFoundError: no case at all was found in ``source``.
        ValueError: a requested id is not among the cases found.
    """
    available = sorted(available)
    if not available:
        raise FileNotFoundError(f"no cases found in {source}")
    if requested is None:
        return available
    missing = sorted(set(requested) - set(available))
    if missing:
        raise ValueError(f"case ids {missing} not found in {source}; available ids: {available}")
    return sorted(set(requested))


def check_label_values(array: np.ndarray, allowed: Iterable[float], source: Path | str) -> None:
    """ValueError naming ``source`` if ``array`` holds a value not in ``allowed``."""
    unknown = sorted(set(np.unique(array).tolist()) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: unknown label values {unknown}; expected only {sorted(allowed)}")


def clip_top_percentile(image: sitk.Image, percentile: float = CLIP_PERCENTILE) -> sitk.Image:
    """Clip intensities above the ``percentile``-th percentile of the whole volume (step 3).

    The pixel type is kept, as in the published pipeline (an integer volume stays integer: the threshold is
    truncated on assignment).
    """
    array = sitk.GetArrayFromImage(image)
    threshold = np.percentile(array, percentile)
    array[array > threshold] = threshold
    clipped = sitk.GetImageFromArray(array)
    clipped.CopyInformation(image)
    return clipped


def resampled_size(size: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> list[int]:
    """Published size rule per axis: ``int(old_size * old_spacing / new_spacing + 1)`` (x, y, z)."""
    scaled = np.asarray(size, dtype=np.float64) * (
        np.asarray(spacing, dtype=np.float64) / np.asarray(new_spacing, dtype=np.float64)
    )
    return [int(s + 1) for s in scaled]


def inplane_grid(image: sitk.Image, spacing_xy: Sequence[float]) -> tuple[list[float], list[int]]:
    """Spacing and size ``(x, y, z)`` of an in-plane-only resampling of ``image`` to ``spacing_xy``: the
    published size rule in x and y, the slices (z spacing and count) kept. Pass both to :func:`resample_image`
    / :func:`resample_label`."""
    spacing = [float(spacing_xy[0]), float(spacing_xy[1]), float(image.GetSpacing()[2])]
    size = resampled_size(image.GetSize(), image.GetSpacing(), spacing)
    return spacing, [size[0], size[1], int(image.GetSize()[2])]


def resample_image(
    image: sitk.Image, new_spacing: Sequence[float], size: Sequence[int] | None = None
) -> sitk.Image:
    """Linear resampling to ``new_spacing`` (x, y, z) on a grid with the same origin and direction (step 4).

    Size ``(x, y, z)`` from :func:`resampled_size` unless given; points outside the input field get 0; the
    pixel type is kept.
    """
    new_spacing = [float(s) for s in new_spacing]
    if size is None:
        size = resampled_size(image.GetSize(), image.GetSpacing(), new_spacing)
    size = [int(v) for v in size]
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        new_spacing,
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )


def resample_label(
    label: sitk.Image, new_spacing: Sequence[float], size: Sequence[int] | None = None
) -> sitk.Image:
    """Resample a label volume the published way (step 4, label rule).

    Each non-zero label value, in increasing order, is resampled as a float32 0/1 mask with linear
    interpolation and rounded; voxels whose rounded mask is 1 take that value, so later (larger) values
    overwrite earlier ones. Returns a UInt8 label on the grid :func:`resample_image` gives for the same input
    (and ``size``).
    """
    array = sitk.GetArrayFromImage(label)
    new_spacing = [float(s) for s in new_spacing]
    if size is None:
        size = resampled_size(label.GetSize(), label.GetSpacing(), new_spacing)
    out = np.zeros([int(v) for v in size][::-1], dtype=np.uint8)
    for value in np.unique(array[array != 0]):
        mask = sitk.GetImageFromArray((array == value).astype(np.float32))
        mask.CopyInformation(label)
        out[np.rint(sitk.GetArrayFromImage(resample_image(mask, new_spacing, size))) == 1] = value
    result = sitk.GetImageFromArray(out)
    result.SetOrigin(label.GetOrigin())
    result.SetSpacing(new_spacing)
    result.SetDirection(label.GetDirection())
    return result


def crop_or_pad_inplane(
    image: sitk.Image, start: Sequence[int], size: Sequence[int], pad_value: float
) -> sitk.Image:
    """In-plane window ``out[z, y, x] = in[z, y + start_y, x + start_x]`` of ``size`` (x, y) voxels.

    ``start`` (x, y) may be negative and the window may reach past the array: those voxels get
    ``pad_value``. The origin moves to the physical point of index ``(start_x, start_y, 0)``, so every voxel
    keeps its physical position; spacing, direction and pixel type are kept.
    """
    array = sitk.GetArrayFromImage(image)
    depth, height, width = array.shape
    (start_x, start_y), (size_x, size_y) = start, size
    out = np.full((depth, size_y, size_x), pad_value, dtype=array.dtype)
    # overlap of the window with the array, in input coordinates
    y0, y1 = max(start_y, 0), min(start_y + size_y, height)
    x0, x1 = max(start_x, 0), min(start_x + size_x, width)
    if y0 < y1 and x0 < x1:
        out[:, y0 - start_y : y1 - start_y, x0 - start_x : x1 - start_x] = array[:, y0:y1, x0:x1]
    result = sitk.GetImageFromArray(out)
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(image.GetDirection())
    result.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((float(start_x), float(start_y), 0.0)))
    return result


def centre_crop_or_pad(image: sitk.Image, pad_value: float, size: Sequence[int] = CROP_SIZE) -> sitk.Image:
    """Crop or pad in-plane to ``size`` (x, y) around the array centre (step 5).

    Output index ``i`` takes input index ``i + n // 2 - size // 2`` per axis (``n`` the input size), which is
    the published rule; see :func:`crop_or_pad_inplane` for padding and geometry.
    """
    start = [n // 2 - s // 2 for n, s in zip(image.GetSize()[:2], size, strict=True)]
    return crop_or_pad_inplane(image, start, size, pad_value)


def mr_image_steps(
    image: sitk.Image, spacing: Sequence[float], size: Sequence[int] | None = None
) -> sitk.Image:
    """MR steps 3-5 (CHAOS and CMR): clip above the 99.5th percentile, resample linearly to ``spacing``
    (and ``size``, see :func:`resample_image`), centre crop/pad to 256 x 256 with the resampled minimum."""
    image = resample_image(clip_top_percentile(image), spacing, size)
    pad_value = float(sitk.GetArrayViewFromImage(image).min())
    return centre_crop_or_pad(image, pad_value)


def mr_label_steps(
    label: sitk.Image, spacing: Sequence[float], size: Sequence[int] | None = None
) -> sitk.Image:
    """The label side of :func:`mr_image_steps`: per-value resampling, centre crop/pad with 0."""
    return centre_crop_or_pad(resample_label(label, spacing, size), 0)


def write_case(
    image: sitk.Image,
    label: sitk.Image,
    folder: Path,
    case_id: int,
    image_pixel_type: int = sitk.sitkFloat64,
    label_pixel_type: int = sitk.sitkFloat64,
) -> tuple[Path, Path]:
    """Write ``image_<id>.nii.gz`` and ``label_<id>.nii.gz`` into ``folder`` (step 6), overwriting.

    Both are cast to the given SimpleITK pixel types (the published copies hold float64 CHAOST2/CMR volumes
    and float32 SABS labels). The label was computed on the image's grid, so it takes the image's geometry
    (sizes are checked; floating-point drift in its origin is not carried).
    """
    if image.GetSize() != label.GetSize():
        raise ValueError(f"case {case_id}: image size {image.GetSize()} != label size {label.GetSize()}")
    folder.mkdir(parents=True, exist_ok=True)
    label = sitk.Cast(label, label_pixel_type)
    label.CopyInformation(image)
    image_path, label_path = folder / f"image_{case_id}.nii.gz", folder / f"label_{case_id}.nii.gz"
    sitk.WriteImage(sitk.Cast(image, image_pixel_type), str(image_path), useCompression=True)
    sitk.WriteImage(label, str(label_path), useCompression=True)
    return image_path, label_path


def run_command(
    argv: Sequence[str] | None,
    dataset: str,
    description: str,
    input_help: str,
    find_cases: Callable[[Path], Mapping[int, Any]],
    preprocess_case: Callable[[Any], tuple[sitk.Image, sitk.Image]],
    pixel_types: tuple[int, int] = (sitk.sitkFloat64, sitk.sitkFloat64),
    describe: Callable[[Any], str] = lambda case: "",
) -> list[Path]:
    """The body of the three preprocessing commands: parse ``--input``/``--output``/``--ids``, find the raw
    cases (``find_cases``: case id → what ``preprocess_case`` takes), preprocess each selected case and write
    it into the dataset's normalised folder inside ``--output`` with ``pixel_types`` (image, label).

    Returns the written paths (image, label, image, label, ...).
    """
    args = build_parser(description, input_help).parse_args(argv)
    cases = find_cases(args.input)
    folder = args.output / get_dataset_info(dataset).image_folder
    written: list[Path] = []
    for case_id in select_ids(cases, args.ids, args.input):
        image, label = preprocess_case(cases[case_id])
        written += write_case(image, label, folder, case_id, *pixel_types)
        where = describe(cases[case_id])
        print(f"{dataset} case {case_id}{where}: {image.GetSize()} -> {written[-2]}", flush=True)
    return written
