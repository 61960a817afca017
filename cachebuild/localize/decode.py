"""Tile images to engine input: decode, scale, lay out; and the checks every describe path shares.

Used by the local describe (:mod:`cachebuild.localize.describe`) and by Dask
workers (:mod:`cachebuild.localize.daskexec`), so neither imports the other's
module for them.  Pillow and numpy are imported inside the functions.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cachebuild._util.cpus import usable_cpus
from cachebuild.errors import BuildError
from cachebuild.store.objects import read_object
from cachebuild.store.thumbs import thumbnail_of

__all__ = ["checked_unit", "decode_batch", "decode_tile", "default_decode_threads", "tile_zxy"]

_PHASE = "describe"

if TYPE_CHECKING:
    import numpy as np


# Added to the decoder threads' nice value (Linux only).
_DECODER_NICENESS = 5


def tile_zxy(tile_id: int) -> tuple[int, int, int]:
    """``(z, x, y)`` of a tile id ``(z << 58) | (x << 29) | y``.

    >>> tile_zxy((17 << 58) | (70000 << 29) | 42000)
    (17, 70000, 42000)
    """
    tile_id = int(tile_id)
    mask = (1 << 29) - 1
    return tile_id >> 58, (tile_id >> 29) & mask, tile_id & mask


def default_decode_threads(cpus: int | None = None) -> int:
    """Decoder threads when the caller names none: one per usable CPU.

    They run at a lower priority than the engine (see the module notes), so
    they take only the CPU time the engine leaves; where the engine runs on
    a GPU, that is all of it.
    """
    if cpus is None:
        cpus = usable_cpus()
    return max(1, cpus)


def _lower_decoder_priority() -> None:
    """Thread initializer: raise this decoder thread's nice value (Linux only).

    Linux applies nice per thread; elsewhere this does nothing.  Raising
    one's own nice value needs no privilege; any error is ignored, since
    only speed is at stake.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + _DECODER_NICENESS))
    except (AttributeError, OSError):
        pass


def decode_tile(path: str | os.PathLike[str] | IO[bytes], size: tuple[int, int]) -> np.ndarray:
    """Decode one tile image (a path or a binary file) to uint8 RGB ``[H, W, 3]`` of ``size`` (H, W).

    JPEG tiles larger than ``size`` are decoded at a reduced scale by
    libjpeg itself; any other size mismatch is resized (bilinear).
    """
    import numpy as np

    return np.asarray(_decode_image(path, size))


def _decode_image(path: str | os.PathLike[str] | IO[bytes], size: tuple[int, int]) -> Any:
    """:func:`decode_tile` as a loaded Pillow RGB image (its pixels in memory)."""
    from PIL import Image

    height, width = size
    with Image.open(path) as im:
        if im.format == "JPEG" and im.size != (width, height):
            im.draft("RGB", (width, height))
        im.load()
        # convert() copies even when the mode is already RGB: skip it then
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        return rgb


def _preprocess_into(rgb: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """``out[c, y, x] = rgb[y, x, c] / 255 - 0.5`` in float32, as ``x / 255 - 0.5``.

    The HWC to CHW transpose is done on the uint8 bytes first (into
    ``scratch``, ``[3, H, W]``): the divide then streams over contiguous
    memory, 1.5x faster than dividing through a strided view.
    """
    import numpy as np

    np.copyto(scratch, rgb.transpose(2, 0, 1))
    np.divide(scratch, np.float32(255.0), out=out)
    np.subtract(out, np.float32(0.5), out=out)


def decode_batch(
    paths: list[Path],
    ids: Any,
    size: tuple[int, int],
    out: np.ndarray,
    thumbs: np.ndarray | None = None,
) -> np.ndarray:
    """Decode and preprocess ``paths`` into ``out[:len(paths)]``; returns that view.

    With ``thumbs`` (uint8 ``[>= len(paths), THUMB_PX, THUMB_PX, 3]``), each
    image's coverage-map thumbnail is made from the same decoded pixels
    (:func:`cachebuild.store.thumbs.thumbnail_of`) into ``thumbs[i]``.
    """
    import numpy as np

    scratch = np.empty((3, *size), dtype=np.uint8)
    for i, path in enumerate(paths):
        # hash checked: a corrupt image would leave a wrong descriptor in the
        # store under the right name (StoreObjectError: the build fetches it again)
        data = read_object(path, what="tile z={} x={} y={}".format(*tile_zxy(ids[i])))
        try:
            image = _decode_image(io.BytesIO(data), size)
        except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError...
            z, x, y = tile_zxy(ids[i])
            raise BuildError(
                f"tile z={z} x={x} y={y} (id {int(ids[i])}) cannot be decoded from store "
                f"object {path}: {type(exc).__name__}: {exc}",
                remedy="delete that store object and run build-cache again to fetch it anew",
                phase=_PHASE,
            ) from exc
        _preprocess_into(np.asarray(image), out[i], scratch)
        if thumbs is not None:
            thumbs[i] = thumbnail_of(image)
    return out[: len(paths)]


def checked_unit(d: Any, ids: Any) -> Any:
    """``d`` L2-normalised in place, or a BuildError naming a tile with a non-finite row."""
    import numpy as np

    if not bool(np.all(np.isfinite(d))):
        bad = int(np.flatnonzero(~np.isfinite(d).all(axis=1))[0])
        z, x, y = tile_zxy(ids[bad])
        raise BuildError(
            f"the engine produced a non-finite descriptor for tile z={z} x={x} y={y}",
            remedy="check the model (MODEL) and recompile the engine",
            phase=_PHASE,
        )
    # the network normalises already; this guards other models and fp16 engines
    norms = np.linalg.norm(d, axis=1, keepdims=True)
    np.divide(d, np.maximum(norms, np.float32(1e-12)), out=d)
    return d
