"""The self-test's frame descriptors: kept between builds, and rendered and described in batches.

:data:`cachebuild.localize.selftest.FRAMES_FILE` keeps each frame's
descriptor under its key (what the descriptor is a function of), so a
rebuild describes only new frames; a damaged or foreign file is ignored.

numpy, Pillow and the engine's backend are imported inside the functions.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_save_npy

__all__: list[str] = []

#: Frames rendered and described at a time.  A batch holds up to nine
#: decoded tiles per frame (the sample is sparse on a large area, so the
#: blocks rarely share tiles): 16 frames keep that under ~30 MB for 256 px
#: tiles, where 64 put ~110 MB on the build's peak RSS.
_BATCH = 16


def _render(mosaic: Any, params: tuple[float, ...], size: int) -> Any:
    import numpy as np
    from PIL import Image

    dx, dy, theta, scale, gain, bias = params
    tile = mosaic.shape[0] // 3
    cx, cy = 1.5 * tile + dx * tile, 1.5 * tile + dy * tile
    s = scale * tile / size
    a, b = s * math.cos(theta), -s * math.sin(theta)
    d, e = s * math.sin(theta), s * math.cos(theta)
    h = size / 2
    # output pixel (u, v) samples the mosaic at centre + R * s * (u - h, v - h)
    coeffs = (a, b, cx - a * h - b * h, d, e, cy - d * h - e * h)
    frame = Image.fromarray(mosaic).transform(
        (size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    out = np.asarray(frame, dtype=np.float32) * np.float32(gain) + np.float32(bias)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _frames_dtype(dim: int) -> Any:
    import numpy as np

    return np.dtype([("key", "u1", (32,)), ("d", "<f4", (dim,))])


def _read_frames(path: Path | None, dim: int) -> dict[bytes, Any]:
    """The kept frame descriptors (key -> row); empty when there are none or they are unusable."""
    import numpy as np

    if path is None or not path.is_file():
        return {}
    try:
        with open(path, "rb") as fh:
            kept = np.load(fh, allow_pickle=False)
        if kept.dtype != _frames_dtype(dim) or kept.ndim != 1 or not np.all(np.isfinite(kept["d"])):
            return {}
    except Exception:  # truncated or garbage: describe the frames again  # noqa: BLE001
        return {}
    return {row["key"].tobytes(): row["d"] for row in kept}


def _write_frames(path: Path, rows: dict[bytes, Any], dim: int) -> None:
    """Write the frame descriptors through a temp file and a rename (never in place)."""

    import numpy as np

    out = np.empty(len(rows), dtype=_frames_dtype(dim))
    for i, (key, d) in enumerate(sorted(rows.items())):
        out[i]["key"] = np.frombuffer(key, dtype=np.uint8)
        out[i]["d"] = d
    atomic_save_npy(path, out)


def _describe_frames(
    jobs: list[tuple[list[int], tuple[float, ...]]],
    paths: dict[int, Path],
    size: tuple[int, int],
    workers: int,
    run: Any,
    unit: int | None = None,
) -> Any:
    """Render and describe frames: each job is (the 3x3 block's tile ids, row by row; parameters).

    Jobs go ``_BATCH`` at a time: the block tiles of a batch are decoded
    once each (hash-checked reads), the frames rendered in threads, and the
    batch run through the engine.  Returns float32 ``[len(jobs), D]``, its
    first ``unit`` columns (None: all) L2-normalised: the descriptor, then
    what else ``run`` gives (the frame's cells).
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from cachebuild.localize.decode import _preprocess_into, decode_tile, tile_zxy
    from cachebuild.store.objects import read_object

    tile = size[0]

    def load(tid: int) -> Any:
        # hash checked (StoreObjectError: the build fetches the image again)
        data = read_object(paths[tid], what="tile z={} x={} y={}".format(*tile_zxy(tid)))
        return decode_tile(io.BytesIO(data), size)

    out = []
    # frames in the order of their centre tile: a batch's blocks overlap, and
    # the tiles the last batch decoded are handed on, so a tile is decoded
    # about once (not once per batch that needs it); results in job order
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0][4])
    kept: dict[int, Any] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="selftest") as pool:
        for s in range(0, len(order), _BATCH):
            part = [jobs[i] for i in order[s : s + _BATCH]]
            unique = sorted({t for block, _ in part for t in block})
            new = [t for t in unique if t not in kept]
            images = {t: kept[t] for t in unique if t in kept}
            images.update(zip(new, pool.map(load, new)))
            kept = images
            batch = np.empty((len(part), 3, *size), dtype=np.float32)

            def frame(i: int, part: Any = part, images: Any = images, batch: Any = batch) -> None:
                block, params = part[i]
                mosaic = np.empty((3 * tile, 3 * tile, 3), dtype=np.uint8)
                for k in range(9):
                    r, c = divmod(k, 3)
                    mosaic[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = images[block[k]]
                _preprocess_into(
                    _render(mosaic, params, tile), batch[i], np.empty((3, *size), dtype=np.uint8)
                )

            list(pool.map(frame, range(len(part))))
            d = np.asarray(run(batch), dtype=np.float32)
            u = d[:, :unit]
            u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), np.float32(1e-12))
            out.append(d)
    if not out:
        return None
    result = np.empty_like(np.concatenate(out))
    result[order] = np.concatenate(out)
    return result
