"""Damaged copies of real files for the fault tests: bit rot that keeps a gzip stream decodable, truncation,
non-finite voxels.

``flip_silent_bit`` is the nasty case of issue 12: one bit flipped in the middle of a ``.nii.gz`` such that
the DEFLATE stream still decodes to the full length (the file keeps its size), so only the gzip CRC-32 in
the trailer tells; SimpleITK and nibabel stop reading before the trailer and return the damaged voxels.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import SimpleITK as sitk

#: Positions tried after the middle of the DEFLATE data (stride in bytes, attempts).
_STRIDE, _ATTEMPTS = 37, 2000


def _deflate_start(data: bytes) -> int:
    """Offset of the DEFLATE data after a gzip member header (RFC 1952 optional fields skipped)."""
    if data[:2] != b"\x1f\x8b":
        raise ValueError("not a gzip file")
    flags, pos = data[3], 10
    if flags & 4:
        pos += 2 + int.from_bytes(data[pos : pos + 2], "little")
    for bit in (8, 16):
        if flags & bit:
            pos = data.index(b"\0", pos) + 1
    return pos + (2 if flags & 2 else 0)


def flip_silent_bit(path: Path) -> int:
    """Flip one bit in the middle of the gzip file ``path`` (in place) so that the DEFLATE data still decode
    to the original length but to other bytes: the size is unchanged and only the CRC-32 disagrees.
    Returns the byte offset flipped."""
    data = path.read_bytes()
    start, end = _deflate_start(data), len(data) - 8
    original = zlib.decompress(data, wbits=31)
    for attempt in range(_ATTEMPTS):
        offset = (start + end) // 2 + attempt * _STRIDE
        for bit in range(8):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                out = inflater.decompress(bytes(damaged[start:end]))
            except zlib.error:
                continue
            if inflater.eof and len(out) == len(original) and out != original:
                path.write_bytes(bytes(damaged))
                return offset
    raise AssertionError(f"no silent bit flip found in {path}")


def truncate(path: Path, fraction: float = 0.5) -> None:
    """Keep the first ``fraction`` of the file's bytes (in place)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def put_voxels(path: Path, values: dict[tuple[int, int, int], float]) -> None:
    """Rewrite a NIfTI file with voxels ``(z, y, x) -> value`` set (dtype and geometry kept; SimpleITK
    writes NaN and Inf as they are)."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    for index, value in values.items():
        array[index] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path), useCompression=str(path).endswith(".gz"))
