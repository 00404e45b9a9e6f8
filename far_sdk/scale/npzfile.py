"""ADM-format ``.npz`` files (``np.savez``'s layout: one ``NAME.npy`` member per array), written byte-reproducibly
and read with every fault a typed :class:`~far_sdk.errors.DataError` naming the file: what ``far generate-dataset``
writes and ``far eval`` reads.

Writing: members are stored (no compression) with fixed timestamps, so equal arrays give equal bytes, and an array
can be streamed into its member piece by piece (its ``.npy`` header first, from the known shape), so a shard never
has to be in memory whole. Reading: each member's ``.npy`` header is checked against the member's size in the zip
directory before any data is read (a header that claims 10^12 elements is refused, not allocated; object arrays,
i.e. pickles, are refused), then the data is read through :mod:`zipfile`, which checks each member's CRC-32: a
truncated or bit-flipped file is a DataError, never a raw ``BadZipFile``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from far_sdk.errors import DataError

ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: np.savez stamps "now", which breaks byte equality
#: what reading a damaged zip or .npy can raise, besides OSError
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError, NotImplementedError)


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIME)
    info.external_attr = 0o644 << 16
    return info


def open_zip(f) -> zipfile.ZipFile:
    """A writer of stored members on the binary file ``f`` (close it before ``f``)."""
    return zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True)


def write_array(zf: zipfile.ZipFile, name: str, a: np.ndarray) -> None:
    """Member ``NAME.npy`` holding ``a`` exactly as ``np.save`` writes it (no pickles)."""
    with zf.open(_member(name), "w", force_zip64=True) as w:
        np.lib.format.write_array(w, np.ascontiguousarray(a), allow_pickle=False)


@contextlib.contextmanager
def stream_array(
    zf: zipfile.ZipFile, name: str, dtype, shape: tuple[int, ...]
) -> Iterator[Callable[[np.ndarray], None]]:
    """Member ``NAME.npy`` of ``dtype`` and ``shape`` written piece by piece: yields ``put(rows)``, which appends rows
    [k, *shape[1:]]; the bytes equal ``np.save`` of the whole array. Fewer or more rows than ``shape[0]``, or rows of
    another shape, raise ValueError (the caller's atomic writer then drops the file)."""
    dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
    expected = math.prod(shape) * dtype.itemsize
    written = 0
    with zf.open(_member(name), "w", force_zip64=True) as w:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(w, header)  # what np.save writes for this header

        def put(rows: np.ndarray) -> None:
            nonlocal written
            rows = np.ascontiguousarray(rows)
            if rows.dtype != dtype or rows.shape[1:] != shape[1:] or written + rows.nbytes > expected:
                raise ValueError(f"{name}: rows {rows.dtype} {rows.shape} do not continue {dtype} {shape}")
            w.write(memoryview(rows).cast("B"))
            written += rows.nbytes

        yield put
        if written != expected:
            raise ValueError(f"{name}: {written} of {expected} bytes written")


def sha256_of_fd(fd: int) -> tuple[str, int]:
    """(sha256, size) of the whole file open (readable) at ``fd``; the file position is restored."""
    h, size, pos = hashlib.sha256(), 0, os.lseek(fd, 0, os.SEEK_CUR)
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        while block := os.read(fd, 1 << 20):
            h.update(block)
            size += len(block)
    finally:
        os.lseek(fd, pos, os.SEEK_SET)
    return h.hexdigest(), size


# ---- reading -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype


def _open(source) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> NpyHeader:
    """The member's .npy header, checked: a known numeric dtype (no pickled objects) and a size that the
    member really holds."""
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise DataError(f"{what}: member {info.filename} is .npy format {version}, which far-sdk does not read")
        shape, _fortran, dtype = read(f)
        offset = f.tell()
    if dtype.hasobject:
        raise DataError(
            f"{what}: member {info.filename} holds Python objects (a pickle); far-sdk reads numeric arrays only"
        )
    need = math.prod(shape) * dtype.itemsize
    if info.file_size - offset != need:
        raise DataError(
            f"{what}: member {info.filename} declares {dtype} {list(shape)} ({need} bytes) but holds "
            f"{info.file_size - offset} bytes: the file is truncated or was altered"
        )
    return NpyHeader(tuple(shape), dtype)


def npz_headers(source, what: str | None = None) -> dict[str, NpyHeader]:
    """{array name: header} of an .npz (a path or its bytes), without reading any array data."""
    what = what or str(source)
    try:
        with _open(source) as zf:
            arrays = [i for i in zf.infolist() if i.filename.endswith(".npy")]  # other members hold no array
            return {i.filename.removesuffix(".npy"): _header(zf, i, what) for i in arrays}
    except DataError:
        raise
    except (OSError, *_READ_ERRORS) as e:
        raise DataError(f"{what} is not a readable .npz file ({type(e).__name__}: {e})") from e


def load_arrays(source, names: tuple[str, ...], what: str | None = None) -> dict[str, np.ndarray]:
    """Arrays ``names`` of an .npz (a path or its bytes), headers checked first and every byte read checked
    against its member's CRC-32. A missing name, a damaged file: DataError naming ``what`` (default: the path)."""
    what = what or str(source)
    headers = npz_headers(source, what)
    missing = [n for n in names if n not in headers]
    if missing:
        raise DataError(
            f"{what} has no {', '.join(missing)} (arrays: {', '.join(headers) or 'none'}); ADM's layout keeps the "
            "images in arr_0"
        )
    try:
        with _open(source) as zf:
            out = {}
            for n in names:
                with zf.open(f"{n}.npy") as f:
                    out[n] = np.lib.format.read_array(f, allow_pickle=False)
                    if f.read(1):  # never: the header check matched the size; reading to the end checks the CRC
                        raise DataError(f"{what}: member {n}.npy holds bytes past its array")
            return out
    except DataError:
        raise
    except (OSError, *_READ_ERRORS) as e:
        raise DataError(f"{what} is not a readable .npz file ({type(e).__name__}: {e})") from e


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes (never a FIFO or a device, which
    could block or never end); else DataError. OSError when it cannot be read."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path} is not a regular file")
    if limit is not None and st.st_size > limit:
        raise DataError(f"{path} is {st.st_size} bytes, over the {limit} this file may hold")
    with open(path, "rb") as f:
        return f.read()
