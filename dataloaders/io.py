"""Volume reader: NIfTI files to ``(Z, H, W)`` arrays plus geometry, paired by case id (spec section 1).

Axis order: SimpleITK's ``GetArrayFromImage`` gives ``(Z, H, W)`` = (slice, row, column), the order every
array in this project uses. Geometry is kept as SimpleITK reports it: ``spacing`` and ``origin`` in
``(x, y, z)`` order (millimetres), ``direction`` the row-major 3x3 cosine matrix as 9 floats, all in ITK's
LPS world frame.

Two NIfTI backends give the same arrays, dtypes and geometry: SimpleITK (the default when it is importable)
and nibabel (pure Python, so a GPU host can train and test without SimpleITK). ``NIFTI_BACKEND`` is chosen
once at import, ``$DIFD_NIFTI_BACKEND`` (``sitk`` or ``nibabel``) overrides it, and every reader/writer
takes ``backend=`` for a single call. The voxels are decoded here for both (the header's ``(x, y, z)``
Fortran order read as a C-ordered ``(Z, H, W)``), the backend parses the header into the geometry: nibabel's
RAS affine becomes LPS by negating the first two rows; spacing = column norms, direction = normalised
columns.
Data preprocessing and supervoxel generation still need SimpleITK (:func:`require_simpleitk`).

Every voxel read goes through :func:`read_volume` (or :func:`read_image` for code that needs a
``SimpleITK.Image``): the file is read and decompressed once with its gzip CRC-32 checked, its length
checked against the header, the voxels decoded from those bytes for both backends, and non-finite voxels
refused (:func:`check_finite`). SimpleITK and nibabel on their own accept a ``.nii.gz`` with damaged bytes
(they stop before the gzip trailer), and SimpleITK zero-fills a truncated file and turns NaN/±Inf into 0.
:func:`read_header` reads the header only (shape checks before the voxels are read).

Files of a dataset ``<data_root>/<NAME>/<image_folder>/image_<id>.nii.gz``, ``label_<id>.nii.gz`` and
``<data_root>/<NAME>/supervoxels_<n_sv>/superpix-MIDDLE_<id>.nii.gz`` are paired by the integer ``<id>`` in
their names (the official code paired them by position in three separately sorted lists). A file without
its partner, partners of different shapes, or a damaged file is an error naming the file.
Supervoxel files carry identity geometry; only their voxel arrays are used and the case's geometry is the
image's.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .datasets import DatasetInfo, get_dataset_info

try:  # libdeflate: the checked gunzip of every NIfTI read about 3x faster than zlib (requirements.txt)
    import deflate as _deflate
except ImportError:  # e.g. a GPU host with the minimal wheel set: zlib does the same checks
    _deflate = None

if TYPE_CHECKING:
    import SimpleITK as sitk

#: NIfTI backends: SimpleITK and nibabel.
NIFTI_BACKENDS = ("sitk", "nibabel")
#: ITK's world frame is LPS, nibabel's RAS: the first two world axes change sign.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def select_nifti_backend(requested: str | None = None) -> str:
    """The NIfTI backend to use: ``requested`` (``'sitk'`` or ``'nibabel'``) when given, otherwise
    ``'sitk'`` if SimpleITK imports and ``'nibabel'`` if not."""
    if requested:
        name = requested.strip().lower()
        if name not in NIFTI_BACKENDS:
            raise ValueError(f"unknown NIfTI backend {requested!r}; expected one of {NIFTI_BACKENDS}")
        return name
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return "nibabel"
    return "sitk"


#: Backend of every reader and writer here unless a call passes ``backend=``.
NIFTI_BACKEND = select_nifti_backend(os.environ.get("DIFD_NIFTI_BACKEND"))


def require_simpleitk(purpose: str) -> ModuleType:
    """The SimpleITK module, or ``ImportError`` saying that ``purpose`` needs it."""
    try:
        import SimpleITK
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs SimpleITK (pip install SimpleITK, pinned in requirements.txt); training and "
            "testing do not (they read NIfTI with nibabel when SimpleITK is missing)"
        ) from err
    return SimpleITK


def _require_nibabel() -> ModuleType:
    try:
        import nibabel
    except ImportError as err:
        raise ImportError(
            "the nibabel NIfTI backend needs nibabel (pip install nibabel, pinned in requirements.txt)"
        ) from err
    return nibabel


def _backend(backend: str | None) -> str:
    return NIFTI_BACKEND if backend is None else select_nifti_backend(backend)


def _reason(err: BaseException) -> str:
    """Last line of an exception's message (SimpleITK's are multi-line), or its type when empty."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


#: channels one OpenCV call accepts (CV_CN_MAX: 512 in OpenCV 4, 128 in OpenCV 5)
CV_MAX_CHANNELS = 128


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume, in SimpleITK's ``(x, y, z)`` order."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        return cls(
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Copy this geometry onto ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_ras_affine(cls, affine: np.ndarray) -> Geometry:
        """Geometry of a nibabel ``(4, 4)`` voxel-to-RAS affine (no shear: columns are spacing x cosines)."""
        lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        direction = lps[:, :3] / spacing
        return cls(
            spacing=tuple(float(v) for v in spacing),
            origin=tuple(float(v) for v in lps[:, 3]),
            direction=tuple(float(v) for v in direction.ravel()),
        )

    def ras_affine(self) -> np.ndarray:
        """The ``(4, 4)`` voxel-to-RAS affine nibabel writes for this geometry."""
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        affine[:3] = RAS_TO_LPS @ affine[:3]
        return affine


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case; ``supervoxel`` is None when supervoxels were not asked for."""

    case_id: int
    image: Path
    label: Path
    supervoxel: Path | None = None


@dataclass
class CaseVolume:
    """One case in memory. Shapes: ``image``, ``label``, ``supervoxel`` all ``(Z, H, W)``.

    ``image`` is float32 in stored units (not normalised), ``label`` uint8 class values after the dataset's
    remap, ``supervoxel`` int32 ids (0 = background) or None.
    """

    case_id: int
    image: np.ndarray
    label: np.ndarray
    supervoxel: np.ndarray | None
    geometry: Geometry
    files: CaseFiles


def _ids_in(folder: Path, pattern: str) -> dict[int, Path]:
    """Map case id -> path for the files in ``folder`` whose names match ``pattern`` (``{id}`` = digits)."""
    prefix, suffix = pattern.split("{id}")
    regex = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + r"\Z")
    found = {}
    for path in folder.iterdir():
        match = regex.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def dataset_folders(
    dataset: str | DatasetInfo, data_root: str | os.PathLike, n_sv: int | None = None
) -> tuple[Path, Path]:
    """``(image_folder, supervoxel_folder)`` of ``dataset`` under ``data_root`` (existence not checked)."""
    info = get_dataset_info(dataset)
    base = Path(data_root) / info.name
    return base / info.image_folder, base / info.supervoxel_folder(n_sv)


def list_cases(
    dataset: str | DatasetInfo,
    data_root: str | os.PathLike,
    supervoxels: bool = False,
    n_sv: int | None = None,
) -> list[CaseFiles]:
    """Every case of ``dataset`` under ``data_root``, sorted by integer case id.

    Images, labels and (with ``supervoxels=True``) supervoxel files are paired by case id; any file whose
    partner is missing raises ``FileNotFoundError`` naming the missing file. Fold positions index this list.
    """
    info = get_dataset_info(dataset)
    image_dir, sv_dir = dataset_folders(info, data_root, n_sv)
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"{info.name}: image folder not found: {image_dir} "
            f"(expected <data_root>/{info.name}/{info.image_folder}/)"
        )
    images = _ids_in(image_dir, info.image_pattern)
    labels = _ids_in(image_dir, info.label_pattern)
    if not images:
        raise FileNotFoundError(f"{info.name}: no files matching {info.image_pattern!r} in {image_dir}")
    groups = [(images, image_dir, info.image_pattern), (labels, image_dir, info.label_pattern)]
    if supervoxels:
        if not sv_dir.is_dir():
            raise FileNotFoundError(
                f"{info.name}: supervoxel folder not found: {sv_dir} "
                f"(make it with data/supervoxels/generate_supervoxels.py --dataset {info.name})"
            )
        groups.append((_ids_in(sv_dir, info.supervoxel_pattern), sv_dir, info.supervoxel_pattern))
    all_ids = set().union(*(found for found, _, _ in groups))
    for found, folder, pattern in groups:
        missing = sorted(all_ids - set(found))
        if missing:
            others = [f for f, _, _ in groups if missing[0] in f]
            raise FileNotFoundError(
                f"{info.name}: missing {folder / pattern.format(id=missing[0])} "
                f"(partner of {others[0][missing[0]]}); {len(missing)} case(s) lack this file: {missing}"
            )
    sv_files = groups[2][0] if supervoxels else {}
    return [
        CaseFiles(case_id=i, image=images[i], label=labels[i], supervoxel=sv_files.get(i))
        for i in sorted(all_ids)
    ]


def read_header(path: str | os.PathLike, backend: str | None = None) -> tuple[tuple[int, int, int], Geometry]:
    """Shape ``(Z, H, W)`` and geometry of a 3-D volume without reading its voxels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"volume not found: {path}")
    if _backend(backend) == "sitk":
        sitk = require_simpleitk("the SimpleITK NIfTI backend")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise ValueError(f"cannot read the header of {path}: {_reason(err)}") from err
        size = reader.GetSize()
        geometry = Geometry.from_image(reader)
    else:
        image = _nibabel_load(path, "the header of ")
        size = _nibabel_shape(image.shape)
        if len(size) == 3:
            geometry = _nibabel_geometry(image.header)
    if len(size) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, found {len(size)} dimensions (size {size})")
    return (int(size[2]), int(size[1]), int(size[0])), geometry


#: What nibabel raises on files it cannot parse or decompress.
_NIBABEL_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def _nibabel_load(path: Path, what: str = "") -> Any:
    """``nibabel.load`` (header only); a parse failure raises ``ValueError`` naming ``what`` and the file."""
    nib = _require_nibabel()
    try:
        return nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, *_NIBABEL_READ_ERRORS) as err:
        raise ValueError(f"cannot read {what}{path}: {_reason(err)}") from err


def _nibabel_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``(x, y, z, ...)`` without trailing size-1 axes beyond the third (ITK drops them as well)."""
    shape = tuple(int(v) for v in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _nibabel_geometry(header: Any) -> Geometry:
    """LPS geometry of a nibabel NIfTI header; without qform and sform ITK's default (origin 0, identity)."""
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        return Geometry(
            spacing=tuple(float(v) for v in header.get_zooms()[:3]),
            origin=(0.0, 0.0, 0.0),
            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        )
    return Geometry.from_ras_affine(header.get_best_affine())


#: First bytes of a gzip member.
GZIP_MAGIC = b"\x1f\x8b"
#: DEFLATE expands data at most about 1032-fold: a header promising more than that is damaged.
MAX_DEFLATE_RATIO = 1032
#: NIfTI ``datatype`` codes of scalar voxels and their NumPy types (byte order from the header).
NIFTI_DTYPES = {
    2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"
}  # fmt: skip


@dataclass(frozen=True)
class NiftiLayout:
    """Where and how a single-file NIfTI-1/2 stores its voxels (the fields a reader needs).

    ``shape`` is ``(Z, H, W)`` (the header's ``dim[3], dim[2], dim[1]``), ``dtype`` carries the file's byte
    order, ``slope``/``inter`` the effective ``scl_slope``/``scl_inter`` (1/0 when the file is unscaled).
    """

    header_size: int
    shape: tuple[int, int, int]
    dtype: np.dtype
    vox_offset: int
    slope: float
    inter: float

    @property
    def data_end(self) -> int:
        """Bytes the uncompressed file needs: the header, extensions and every voxel."""
        return self.vox_offset + int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def parse_nifti_layout(header: bytes, path: str | os.PathLike) -> NiftiLayout:
    """The :class:`NiftiLayout` of the uncompressed first bytes of a ``.nii`` file (NIfTI-1 or NIfTI-2).

    Anything but a scalar 3-D volume (trailing size-1 axes beyond the third allowed, as ITK and nibabel
    allow them), or a header whose fields contradict each other, raises ``ValueError`` naming ``path``.
    """
    for order in "<>":
        size = int(np.frombuffer(header[:4], dtype=f"{order}i4")[0]) if len(header) >= 4 else 0
        if size in (348, 540):
            break
    else:
        raise ValueError(f"cannot read {path}: not a NIfTI-1/NIfTI-2 file (no 348 or 540 header size)")
    if len(header) < size:
        raise ValueError(f"{path} is truncated: {len(header)} bytes, a NIfTI header has {size}")

    def field(dtype: str, offset: int, count: int = 1) -> np.ndarray:
        return np.frombuffer(header, dtype=order + dtype, count=count, offset=offset)

    if size == 348:
        dims, datatype = field("i2", 40, 8).astype(np.int64), int(field("i2", 70)[0])
        vox_offset = float(field("f4", 108)[0])
        slope, inter = float(field("f4", 112)[0]), float(field("f4", 116)[0])
    else:
        dims, datatype = field("i8", 16, 8), int(field("i2", 12)[0])
        vox_offset = float(field("i8", 168)[0])
        slope, inter = float(field("f8", 176)[0]), float(field("f8", 184)[0])
    n_dims = int(dims[0])
    if not 1 <= n_dims <= 7 or (dims[1 : n_dims + 1] < 1).any():
        raise ValueError(f"{path}: invalid NIfTI dimensions {dims[: max(n_dims, 0) + 1].tolist()}")
    shape = tuple(int(v) for v in dims[1 : n_dims + 1])
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ValueError(
            f"{path}: expected a scalar 3-D volume, found {len(shape)} dimensions (size {shape})"
        )
    if datatype not in NIFTI_DTYPES:
        raise ValueError(
            f"{path}: expected scalar voxels (NIfTI datatype {sorted(NIFTI_DTYPES)}), "
            f"found datatype {datatype}"
        )
    if vox_offset < size or vox_offset != int(vox_offset):
        raise ValueError(f"{path}: invalid NIfTI vox_offset {vox_offset} (header size {size})")
    # ITK's rule: a zero or non-finite scl_slope means unscaled data
    if slope == 0.0 or not np.isfinite(slope):
        slope, inter = 1.0, 0.0
    elif not np.isfinite(inter):
        raise ValueError(f"{path}: scl_slope {slope} with a non-finite scl_inter {inter}")
    return NiftiLayout(
        header_size=size,
        shape=(shape[2], shape[1], shape[0]),
        dtype=np.dtype(order + NIFTI_DTYPES[datatype]),
        vox_offset=int(vox_offset),
        slope=slope,
        inter=inter,
    )


def _gunzip_checked(data: bytes, path: Path) -> bytes:
    """Every member of a gzip stream, decompressed with their CRC-32 and length checked (zlib)."""
    out, rest = [], data
    while rest:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out.append(inflater.decompress(rest))
        except zlib.error as err:
            cause = "gzip CRC-32 mismatch" if "incorrect data check" in str(err) else str(err)
            raise ValueError(f"{path} is corrupt ({cause}): its bytes were damaged") from err
        if not inflater.eof:
            raise ValueError(f"{path} is truncated: its gzip stream ends in the middle of the data")
        rest = inflater.unused_data
        if rest and rest[:2] != GZIP_MAGIC:
            raise ValueError(f"{path} is corrupt: {len(rest)} bytes that are no gzip member follow the data")
    return b"".join(out)


def read_nifti_bytes(path: str | os.PathLike) -> tuple[bytearray, NiftiLayout]:
    """The whole uncompressed content of a ``.nii`` or ``.nii.gz`` file, checked, and its layout.

    The file is read once. A gzip stream is decompressed once with its CRC-32 and length checked (both
    SimpleITK and nibabel stop before the gzip trailer, so neither notices damaged bytes), with libdeflate
    when the ``deflate`` package is installed (about 3x faster than zlib) and with zlib otherwise. Damaged
    (CRC mismatch), truncated or non-NIfTI content raises ``ValueError`` naming the file. Whether the file
    is compressed is told by its first bytes, not by its name (ITK reads both either way).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"volume not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from err
    if data[:2] != GZIP_MAGIC:
        layout = parse_nifti_layout(data[:540], path)
        raw = bytearray(data)
    else:
        try:
            head = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data, 540)
        except zlib.error as err:
            raise ValueError(f"cannot read {path}: damaged gzip stream ({err})") from err
        layout = parse_nifti_layout(head, path)
        if layout.data_end > MAX_DEFLATE_RATIO * len(data):
            raise ValueError(
                f"{path} is truncated or corrupt: its header promises {layout.data_end} bytes, more than "
                f"{len(data)} compressed bytes can hold"
            )
        raw = _inflate_fast(data, layout.data_end)
        if raw is None:  # no libdeflate, or it refused: zlib decides, and says why
            raw = bytearray(_gunzip_checked(data, path))
    if len(raw) < layout.data_end:
        raise ValueError(
            f"{path} is truncated: {len(raw)} bytes of NIfTI data, its header needs {layout.data_end}"
        )
    return raw, layout


def _inflate_fast(data: bytes, size: int) -> bytearray | None:
    """libdeflate's one-shot gunzip of a single member of exactly ``size`` bytes (its CRC-32 and length
    checked), or None when libdeflate is absent or refuses (damage, several members, another size)."""
    if _deflate is None:
        return None
    try:
        out = _deflate.gzip_decompress(data, size)
    except (_deflate.DeflateError, ValueError):
        return None
    # libdeflate decodes the first member only: the file must end with that member's length field,
    # otherwise more members or stray bytes follow and the zlib path judges them
    if len(out) != size or int.from_bytes(data[-4:], "little") != size % 2**32:
        return None
    return out


def decode_voxels(raw: bytearray, layout: NiftiLayout, path: str | os.PathLike) -> np.ndarray:
    """The ``(Z, H, W)`` voxel array of an uncompressed NIfTI (:func:`read_nifti_bytes`), as ITK gives it.

    The voxels of ``raw`` are used in place (the array shares ``raw``'s memory) unless a byte swap or the
    header's scaling makes a new array: scaled data come back as float32 (float64 when stored as float64),
    as ITK returns them. Non-finite voxels raise ``ValueError`` (:func:`check_finite`): ITK would have
    turned them into 0 without a word.
    """
    count = int(np.prod(layout.shape, dtype=np.int64))
    array = np.frombuffer(raw, dtype=layout.dtype, count=count, offset=layout.vox_offset)
    array = array.reshape(layout.shape)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if (layout.slope, layout.inter) != (1.0, 0.0):
        target = np.float64 if array.dtype == np.float64 else np.float32
        array = (array.astype(np.float64) * layout.slope + layout.inter).astype(target)
    check_finite(array, path)
    return array


def read_volume(path: str | os.PathLike, backend: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a 3-D NIfTI volume (``.nii`` or ``.nii.gz``). Returns the ``(Z, H, W)`` array and its geometry.

    The one guarded entry point for voxels: the file is read and decompressed once with its gzip CRC-32
    checked (:func:`read_nifti_bytes`), the voxels are decoded from those bytes (:func:`decode_voxels`:
    stored dtype; scaled data as float32, or float64 when stored as float64, as ITK returns them) and
    non-finite voxels are refused, whatever the backend. ``backend`` (``'sitk'``, ``'nibabel'`` or None for
    ``NIFTI_BACKEND``) parses the header into the geometry: SimpleITK's header reader, or nibabel's header
    read from the bytes already in memory. A missing file raises ``FileNotFoundError``; a damaged,
    truncated, non-NIfTI, non-3-D or non-finite one ``ValueError``, both naming the file.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: expected a NIfTI volume (.nii or .nii.gz)")
    raw, layout = read_nifti_bytes(path)
    array = decode_voxels(raw, layout, path)
    if _backend(backend) == "nibabel":
        nib = _require_nibabel()
        header_class = nib.Nifti1Header if layout.header_size == 348 else nib.Nifti2Header
        try:
            header = header_class.from_fileobj(io.BytesIO(bytes(raw[: layout.vox_offset])))
        except (nib.spatialimages.HeaderDataError, *_NIBABEL_READ_ERRORS) as err:
            raise ValueError(f"cannot read the header of {path}: {_reason(err)}") from err
        return array, _nibabel_geometry(header)
    sitk = require_simpleitk("the SimpleITK NIfTI backend")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ValueError(f"cannot read the header of {path}: {_reason(err)}") from err
    size = _nibabel_shape(reader.GetSize())
    if size != layout.shape[::-1] or reader.GetNumberOfComponents() != 1:
        raise ValueError(
            f"{path}: SimpleITK reads a size {tuple(reader.GetSize())} with "
            f"{reader.GetNumberOfComponents()} component(s), the NIfTI header says {layout.shape[::-1]}"
        )
    return array, Geometry.from_image(reader)


def read_image(path: str | os.PathLike) -> sitk.Image:
    """A ``SimpleITK.Image`` of any file SimpleITK reads, for code that works on images (preprocessing).

    NIfTI files go through :func:`read_volume` (gzip CRC-32, truncation and non-finite voxels checked; the
    metadata dictionary is not carried, the pixel type and geometry are SimpleITK's). Other formats (PNG,
    DICOM) are read by SimpleITK, which refuses the truncated and damaged files these formats can detect
    (PNG chunk CRCs); a failure is a ``ValueError`` naming the file, and floating-point pixels must be
    finite.
    """
    sitk = require_simpleitk("reading images with SimpleITK")
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        array, geometry = read_volume(path, backend="sitk")
        return geometry.apply_to(sitk.GetImageFromArray(array))
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ValueError(f"cannot read {path}: {_reason(err)}") from err
    check_finite(sitk.GetArrayViewFromImage(image), path)
    return image


def write_volume(
    array: np.ndarray, geometry: Geometry, path: str | os.PathLike, backend: str | None = None
) -> None:
    """Write a ``(Z, H, W)`` array with ``geometry`` (e.g. a prediction saved beside its query volume).

    Both backends write the array's dtype, qform and sform (code 1, scanner) and millimetre units, so either
    reads the file back with the same array and geometry.
    """
    if array.ndim != 3:
        raise ValueError(f"write_volume: expected a (Z, H, W) array, got shape {array.shape}")
    if _backend(backend) == "sitk":
        sitk = require_simpleitk("the SimpleITK NIfTI backend")
        sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(array)), str(path))
        return
    nib = _require_nibabel()
    affine = geometry.ras_affine()
    image = nib.Nifti1Image(np.asarray(array).T, affine, dtype=array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def check_case(case: CaseFiles) -> tuple[tuple[int, int, int], Geometry]:
    """Read the headers of a case's files and check that their shapes agree. Returns shape and geometry."""
    shape, geometry = read_header(case.image)
    partners = [case.label] + ([case.supervoxel] if case.supervoxel is not None else [])
    for path in partners:
        other, _ = read_header(path)
        if other != shape:
            raise ValueError(
                f"shape mismatch: {path} has (Z,H,W)={other}, its image {case.image} has {shape}"
            )
    return shape, geometry


def remap_labels(
    label: np.ndarray, dataset: str | DatasetInfo, path: str | os.PathLike = "<array>"
) -> np.ndarray:
    """Turn stored label values into class values (uint8), applying the dataset's on-disk remap.

    Values already equal to a class value are kept, so CMR labels stored as 1/2/3 load as well as the
    published 200/500/600. Non-integer or unknown values raise ``ValueError`` naming ``path``.
    """
    info = get_dataset_info(dataset)
    values = np.unique(label)
    if not np.array_equal(values, np.rint(values)):
        raise ValueError(
            f"{path}: label values must be integers, found {values[values != np.rint(values)][:5]}"
        )
    table = {0: 0, **{v: v for v in info.label_names}, **dict(info.label_remap)}
    unknown = [int(v) for v in values if int(v) not in table]
    if unknown:
        raise ValueError(
            f"{path}: unknown label values {unknown} for {info.name}; expected 0, {sorted(info.label_names)}"
            + (f" or stored values {sorted(info.label_remap)}" if info.label_remap else "")
        )
    out = np.zeros(label.shape, dtype=np.uint8)
    for v in values:
        if table[int(v)] != 0:
            out[label == v] = table[int(v)]
    return out


def read_case(case: CaseFiles, dataset: str | DatasetInfo) -> CaseVolume:
    """Read image, label (remapped) and, when listed, supervoxels of one case; shapes must agree."""
    image, geometry = read_volume(case.image)
    label, _ = read_volume(case.label)
    if label.shape != image.shape:
        raise ValueError(
            f"shape mismatch: {case.label} has (Z,H,W)={label.shape}, its image {case.image} has "
            f"{image.shape}"
        )
    supervoxel = None
    if case.supervoxel is not None:
        supervoxel, _ = read_volume(case.supervoxel)
        if supervoxel.shape != image.shape:
            raise ValueError(
                f"shape mismatch: {case.supervoxel} has (Z,H,W)={supervoxel.shape}, its image "
                f"{case.image} has {image.shape}"
            )
        if not np.issubdtype(supervoxel.dtype, np.integer):
            raise ValueError(
                f"{case.supervoxel}: supervoxel ids must be integers, found dtype {supervoxel.dtype}"
            )
        supervoxel = supervoxel.astype(np.int32, copy=False)
    return CaseVolume(
        case_id=case.case_id,
        image=image.astype(np.float32, copy=False),
        label=remap_labels(label, dataset, case.label),
        supervoxel=supervoxel,
        geometry=geometry,
        files=case,
    )


def check_finite(array: np.ndarray, source: str | os.PathLike = "<array>") -> None:
    """Raise ``ValueError`` if a floating-point ``array`` holds NaN or ±Inf voxels.

    The message names ``source``, counts the non-finite voxels by kind and gives the first one's index in
    the array's own axis order (``(z, y, x)`` for the project's volumes). Integer arrays pass unchecked.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    n_bad = int(np.count_nonzero(bad))
    n_nan = int(np.count_nonzero(np.isnan(array)))
    n_pos = int(np.count_nonzero(np.isposinf(array)))
    first = tuple(int(v) for v in np.unravel_index(int(np.argmax(bad)), array.shape))
    raise ValueError(
        f"{source}: {n_bad} non-finite voxel(s) of {array.size} (NaN {n_nan}, +Inf {n_pos}, "
        f"-Inf {n_bad - n_nan - n_pos}); the first at index {first} of shape {array.shape}"
    )


def normalize_volume(image: np.ndarray, path: str | os.PathLike = "<array>") -> np.ndarray:
    """Spec section 1 normalisation: ``(img - mean) / std`` over the whole volume, as float32."""
    image64 = image.astype(np.float64, copy=False)
    std = float(image64.std())
    if not np.isfinite(std) or std == 0.0:
        raise ValueError(f"{path}: cannot normalise a constant or non-finite volume (std={std})")
    return ((image64 - image64.mean()) / std).astype(np.float32)


def resize_slices(array: np.ndarray, size: int | None, nearest: bool) -> np.ndarray:
    """Resize every slice of ``(N, H, W)`` to ``(N, size, size)``: bilinear for images, nearest for labels.

    ``size=None`` or a size equal to ``H`` and ``W`` returns the input unchanged.
    """
    if array.ndim != 3:
        raise ValueError(f"resize_slices: expected (N, H, W), got shape {array.shape}")
    if size is None or array.shape[1:] == (size, size):
        return array
    if int(size) < 1:
        raise ValueError(f"resize_slices: size must be a positive int, got {size!r}")
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    if array.shape[0] == 0:
        return np.zeros((0, size, size), dtype=array.dtype)
    work = array if nearest or array.dtype == np.float32 else array.astype(np.float32)
    # one cv2 call takes at most CV_MAX_CHANNELS channels: slices go in as channel chunks
    out = np.empty((array.shape[0], size, size), dtype=work.dtype)
    for start in range(0, array.shape[0], CV_MAX_CHANNELS):
        chunk = np.ascontiguousarray(work[start : start + CV_MAX_CHANNELS].transpose(1, 2, 0))
        if nearest and chunk.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
            chunk = chunk.astype(np.float32)
        resized = cv2.resize(chunk, (size, size), interpolation=interpolation)
        out[start : start + CV_MAX_CHANNELS] = resized.reshape(size, size, -1).transpose(2, 0, 1)
    return out


def to_three_channels(slices: np.ndarray) -> np.ndarray:
    """Repeat the single channel: ``(N, H, W) -> (N, 3, H, W)`` (spec section 1)."""
    return np.repeat(slices[:, None], 3, axis=1)
