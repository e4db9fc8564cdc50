"""Reading untrusted ``.npz`` bytes: plain numeric arrays only, sizes checked first.

``numpy.load`` allocates what an entry's header claims before reading its data, so a
header claiming ``2**40`` elements is a memory bomb. ``read_npz`` checks each header
against the bytes the entry really holds, and the archive's total against a limit, before
anything is allocated; object and structured dtypes are refused (never unpickled).
"""

from __future__ import annotations

import io
import math
import zipfile

import numpy as np

from .errors import ArtifactError

__all__ = ["MAX_ENTRIES", "MAX_NDIM", "read_npz"]

MAX_ENTRIES = 4096
MAX_NDIM = 8


def _entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject or dtype.fields is not None or len(shape) > MAX_NDIM:
            raise ArtifactError(f"{where}: not a numpy .npz of plain arrays (entry "
                                f"{info.filename!r} has dtype {dtype} and shape {shape})")
        nbytes = math.prod(shape) * dtype.itemsize
        held = info.file_size - f.tell()
        if nbytes != held:
            raise ArtifactError(f"{where}: not a numpy .npz of plain arrays (entry "
                                f"{info.filename!r} claims {nbytes} bytes of data and holds "
                                f"{held})")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise ArtifactError(f"{where}: not a numpy .npz of plain arrays (entry "
                            f"{info.filename!r} is truncated)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def read_npz(data: bytes, where: str, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive (``numpy.savez``), by name.

    Args:
        data: the archive's bytes.
        where: what to name in errors (a path or URL).
        max_bytes: the largest uncompressed total accepted.

    Raises:
        ArtifactError: not an archive of plain arrays, or above the limits (named).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            total = sum(i.file_size for i in infos)
            if len(infos) > MAX_ENTRIES or total > max_bytes:
                raise ArtifactError(f"{where}: {len(infos)} entries of {total} bytes; at most "
                                    f"{MAX_ENTRIES} entries and {max_bytes} bytes are read")
            out = {}
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise ArtifactError(f"{where}: not a numpy .npz of plain arrays (entry "
                                        f"{info.filename[:80]!r} is not a .npy)")
                out[info.filename[:-4]] = _entry(archive, info, where)
            return out
    except ArtifactError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile,
            NotImplementedError, RuntimeError, SyntaxError, KeyError) as exc:
        # zipfile and numpy's header parser raise these on damaged bytes
        raise ArtifactError(f"{where}: not a numpy .npz of plain arrays "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from None
