""".npy files written and read in row chunks, so memory stays bounded.

``numpy.save`` needs the whole array in memory and ``numpy.load(mmap_mode=…)``
keeps every page it touched resident (a memory map counts toward RSS).  At a
million 256-d descriptors (1 GiB) neither is acceptable next to an index of
the same size, so the describe, index and self-test stages go through these
helpers instead: a header, then rows appended or read with plain ``write``
and ``readinto`` calls through one reused buffer.

The files are ordinary version-1 .npy files; ``numpy.load`` reads them.

numpy is imported inside the functions.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["NpyRowWriter", "npy_shape", "iter_npy_rows", "gather_npy_rows"]

#: Bytes read per chunk when a caller names no row count.
_CHUNK_BYTES = 16 << 20


class NpyRowWriter:
    """Write a C-order .npy file of known shape, rows at a time, atomically.

    The file is written under a temporary name beside ``path`` and renamed
    onto it by :meth:`close` once exactly ``shape[0]`` rows were written; on
    an exception (or fewer rows) the temporary file is removed and ``path``
    is left as it was.

    >>> import numpy as np, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.npy"
    >>> with NpyRowWriter(p, "<f4", (3, 2)) as w:
    ...     w.write(np.zeros((2, 2), np.float32)); w.write(np.ones((1, 2), np.float32))
    >>> np.load(p).tolist()
    [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    """

    def __init__(self, path: str | os.PathLike[str], dtype: Any, shape: tuple[int, ...]):
        import numpy as np

        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.rows = 0
        self._tmp = self.path.with_name(
            f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self._fh: Any = open(self._tmp, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": self.shape,
        }
        try:
            np.lib.format.write_array_header_1_0(self._fh, header)
        except BaseException:
            self.abort()
            raise

    def write(self, rows: Any) -> None:
        """Append ``rows`` (shape ``[k, *shape[1:]]``, cast to the file's dtype)."""
        import numpy as np

        a = np.ascontiguousarray(rows, dtype=self.dtype)
        if a.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows of shape {a.shape[1:]} written to a {self.shape} array")
        if self.rows + len(a) > self.shape[0]:
            raise ValueError(f"more than {self.shape[0]} rows written to {self.path}")
        self._fh.write(a.data)
        self.rows += len(a)

    def close(self) -> None:
        """Rename the finished file onto ``path``; refuse a short one."""
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            fh.close()
        except BaseException:  # the last flush failed (a full disk): no half file left
            self._tmp.unlink(missing_ok=True)
            raise
        if self.rows != self.shape[0]:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is untouched."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:  # flushing what is buffered can fail again (a full disk)
                pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
        else:
            self.abort()


def _open(path: Path) -> tuple[Any, Any, tuple[int, ...], int]:
    """``(file, dtype, shape, data offset)`` of a C-order .npy file."""
    import numpy as np

    fh = open(path, "rb")
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: only C-order arrays of plain values are read in chunks")
        return fh, dtype, tuple(shape), fh.tell()
    except BaseException:
        fh.close()
        raise


def npy_shape(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], Any]:
    """``(shape, dtype)`` of a .npy file, from its header alone."""
    fh, dtype, shape, _ = _open(Path(path))
    fh.close()
    return shape, dtype


def iter_npy_rows(
    path: str | os.PathLike[str], chunk_rows: int | None = None
) -> Iterator[tuple[int, Any]]:
    """Yield ``(first row, rows)`` of a .npy file, ``chunk_rows`` rows at a time.

    The yielded array is a view of one reused buffer: it is valid until the
    next iteration (copy it to keep it).

    Raises
    ------
    ValueError
        When the file is shorter than its header says.
    """
    import numpy as np

    fh, dtype, shape, _ = _open(Path(path))
    with fh:
        n = shape[0] if shape else 1
        row_shape = shape[1:]
        row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        if chunk_rows is None:
            chunk_rows = max(1, _CHUNK_BYTES // max(1, row_bytes))
        buf = np.empty((min(chunk_rows, max(n, 1)), *row_shape), dtype=dtype)
        start = 0
        while start < n:
            k = min(chunk_rows, n - start)
            view = buf[:k]
            got = fh.readinto(view.data.cast("B"))
            if got != k * row_bytes:
                raise ValueError(
                    f"{path} is truncated: row {start + got // max(row_bytes, 1)} of {n}"
                )
            yield start, view
            start += k


def gather_npy_rows(path: str | os.PathLike[str], rows: Any) -> Any:
    """The given rows of a .npy file, in the order given, in one sequential pass.

    Parameters
    ----------
    path
        A C-order .npy file.
    rows
        Row numbers (any order, repeats allowed).

    Returns
    -------
    numpy.ndarray
        ``[len(rows), *shape[1:]]``.
    """
    import numpy as np

    rows = np.asarray(rows, dtype=np.int64)
    shape, dtype = npy_shape(path)
    if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
        raise IndexError(f"row out of range for {path} with {shape[0]} rows")
    out = np.empty((len(rows), *shape[1:]), dtype=dtype)
    if not len(rows):
        return out
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    i = 0
    for start, chunk in iter_npy_rows(path):
        end = start + len(chunk)
        j = int(np.searchsorted(wanted, end, side="left"))
        if j > i:
            out[order[i:j]] = chunk[wanted[i:j] - start]
            i = j
        if i == len(wanted):
            break
    return out
