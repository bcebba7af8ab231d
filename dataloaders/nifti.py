"""NIfTI files: one checked reader and one writer behind the same interface for both backends.

Two NIfTI backends give the same arrays, dtypes and geometry (:mod:`dataloaders.volume` states the axis
order and the geometry's conventions): SimpleITK (the default when it is importable) and nibabel (pure
Python, so a GPU host can train and test without SimpleITK). ``NIFTI_BACKEND`` is chosen once at import,
``$DIFD_NIFTI_BACKEND`` (``sitk`` or ``nibabel``) overrides it, and every reader/writer takes ``backend=`` for
a single call. The voxels are decoded here for both (the header's ``(x, y, z)`` Fortran order read as a
C-ordered ``(Z, H, W)``), the backend parses the header into the geometry: nibabel's RAS affine becomes LPS
by negating the first two rows; spacing = column norms, direction = normalised columns.

Every voxel read goes through :func:`read_volume` (or :func:`read_image` for code that needs a
``SimpleITK.Image``): the file is read and decompressed once with its gzip CRC-32 checked, its length
checked against the header, the voxels decoded from those bytes for both backends, and non-finite voxels
refused (:func:`~dataloaders.volume.check_finite`). SimpleITK and nibabel on their own accept a ``.nii.gz``
with damaged bytes (they stop before the gzip trailer), and SimpleITK zero-fills a truncated file and turns
NaN/±Inf into 0. :func:`read_header` reads the header only (shape checks before the voxels are read).
:func:`write_volume` writes through :func:`utils.write_atomically`.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from utils import write_atomically

from .volume import Geometry, check_finite, require_simpleitk

try:  # libdeflate: a faster checked gunzip than zlib (requirements.txt; docs/speed.md)
    import deflate as _deflate
except ImportError:  # e.g. a GPU host with the minimal wheel set: zlib does the same checks
    _deflate = None

if TYPE_CHECKING:
    import SimpleITK as sitk

#: NIfTI backends: SimpleITK and nibabel.
NIFTI_BACKENDS = ("sitk", "nibabel")


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


def _sitk_header(path: Path) -> sitk.ImageFileReader:
    """SimpleITK's reader of ``path`` with the header read (no voxels); failures name the file."""
    sitk = require_simpleitk("the SimpleITK NIfTI backend")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ValueError(f"cannot read the header of {path}: {_reason(err)}") from err
    return reader


def read_header(path: str | os.PathLike, backend: str | None = None) -> tuple[tuple[int, int, int], Geometry]:
    """Shape ``(Z, H, W)`` and geometry of a 3-D volume without reading its voxels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"volume not found: {path}")
    if _backend(backend) == "sitk":
        reader = _sitk_header(path)
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
    when the ``deflate`` package is installed (faster than zlib) and with zlib otherwise. Damaged
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
    reader = _sitk_header(path)
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
) -> Path:
    """Write a ``(Z, H, W)`` array with ``geometry`` (e.g. a prediction saved beside its query volume),
    through :func:`utils.write_atomically` (no partial file is ever visible under ``path``), read back whole
    before it is renamed into place.

    Both backends write the array's dtype, qform and sform (code 1, scanner) and millimetre units, so either
    reads the file back with the same array and geometry.
    """
    if array.ndim != 3:
        raise ValueError(f"write_volume: expected a (Z, H, W) array, got shape {array.shape}")
    if _backend(backend) == "sitk":
        sitk = require_simpleitk("the SimpleITK NIfTI backend")

        def write(tmp: Path) -> None:
            sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(array)), str(tmp))

    else:
        nib = _require_nibabel()
        affine = geometry.ras_affine()
        image = nib.Nifti1Image(np.asarray(array).T, affine, dtype=array.dtype)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm", "sec")

        def write(tmp: Path) -> None:
            nib.save(image, str(tmp))

    return write_atomically(path, write, what="volume", keep_suffix=True, verify=_check_written)


def _check_written(tmp: Path) -> None:
    """The written file reads back whole: nibabel on a full disk leaves an empty file and raises nothing
    (seen on a full tmpfs), which is then reported as the full disk it is."""
    try:
        read_nifti_bytes(tmp)
    except ValueError as err:
        if shutil.disk_usage(tmp.parent).free < 2**20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from err
        raise OSError(f"it does not read back: {err}") from err
