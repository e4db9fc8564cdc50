"""Reading untrusted ``.npz`` archives member by member, sizes checked before allocation.

``np.load`` trusts each ``.npy`` header: a header declaring a huge shape allocates (or
raises ``MemoryError``) and a deflated member can expand without bound. Here every
member's ``ZipInfo`` and header are checked first: only plain numeric dtypes, a data size
equal to the header's shape times the item size, stored (uncompressed) members when
asked, and a total budget over all members. Nothing is unpickled.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Sequence

import numpy as np

__all__ = ["MAX_NDIM", "MalformedArchive", "check_members", "read_arrays", "read_npy"]

MAX_NDIM = 8


class MalformedArchive(Exception):
    """An archive member that is not a plain array or breaks a size limit; the message
    names the member. Callers turn it into their own ``SecureInferError``."""


def read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member, its header checked against the member's size before the data
    is read (a header claiming a huge shape is refused, not allocated)."""
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject or dtype.fields is not None or len(shape) > MAX_NDIM:
            raise MalformedArchive(f"entry {info.filename}: dtype {dtype} of shape {shape} is "
                                   "not a plain numeric array (object arrays are never read)")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != info.file_size - f.tell():
            raise MalformedArchive(f"entry {info.filename}: its header claims {nbytes} bytes "
                                   f"of data, the entry holds {info.file_size - f.tell()}")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise MalformedArchive(f"entry {info.filename} is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def check_members(infos: Sequence[zipfile.ZipInfo], *, max_entries: int, max_bytes: int,
                  stored_only: bool = False) -> None:
    """Refuse too many members, more than ``max_bytes`` uncompressed in all, or (with
    ``stored_only``) any compressed member, before anything is read."""
    total = sum(info.file_size for info in infos)
    if len(infos) > max_entries or total > max_bytes:
        raise MalformedArchive(f"{len(infos)} entries of {total} bytes in all; at most "
                               f"{max_entries} entries and {max_bytes} bytes are read")
    if stored_only:
        packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
        if packed:
            raise MalformedArchive(f"entry {packed[0]} is compressed; only stored entries "
                                   "are read (numpy.savez, not savez_compressed)")


def read_arrays(data: bytes, *, max_entries: int, max_bytes: int,
                stored_only: bool = True) -> dict[str, np.ndarray]:
    """Every member of the ``.npz`` in ``data`` by name (``.npy`` suffix removed)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        check_members(infos, max_entries=max_entries, max_bytes=max_bytes,
                      stored_only=stored_only)
        return {info.filename.removesuffix(".npy"): read_npy(archive, info) for info in infos}
