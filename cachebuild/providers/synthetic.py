"""The built-in offline provider: deterministic synthetic imagery, no network.

Each pixel is a function of its *global* pixel coordinates at the tile's
zoom, so the imagery runs on seamlessly across tile borders (and across the
antimeridian: the world wraps), while every tile looks different from its
neighbours.  That is what a localisation self-test needs from fake
satellite imagery: texture at several scales, no repeats, no seams.

The picture is value noise: a hashed integer lattice, smoothstep
interpolation, five octaves with cells of 128 down to 8 pixels.  Three
noise fields make the landscape: one picks a "field" colour (softly
quantised into patches with sharp-ish borders), one gives texture, one draws
"roads" along one of its contour lines.

Interpolation is separable, so one octave of one field is ``Wy @ V @ Wx.T``
with ``V`` the few lattice values under the tile and ``Wy``, ``Wx`` the
(cached) smoothstep weight matrices; with every octave side by side that
is two small matrix products per field instead of per-pixel hashing.  The
large arrays are per-thread buffers reused from tile to tile.  About 2 ms a
tile, JPEG included, on one core.

numpy and Pillow are imported inside the functions that use them.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cachebuild.tilemath import Tile

__all__ = [
    "SYNTHETIC_VERSION",
    "DEFAULT_TILE_SIZE",
    "DEFAULT_QUALITY",
    "render_tile",
    "synthetic_tile_bytes",
]

#: Bump when the picture changes: it is part of the provider's identity.
SYNTHETIC_VERSION = 1
DEFAULT_TILE_SIZE = 256
DEFAULT_QUALITY = 90

#: Lattice cell sizes in pixels, coarse to fine.
_CELLS = (128, 64, 32, 16, 8)
#: Each octave's lattice is shifted by these many pixels (x, y): smoothstep
#: is flat on lattice lines, and lines shared by every octave (tile borders
#: among them) would show as a grid.
_OFFSETS_X = (53, 23, 13, 5, 3)
_OFFSETS_Y = (71, 41, 7, 11, 5)
#: Each field's weight per octave, for the first octaves only (the fine ones
#: cost as much as the coarse ones and would barely show in colours or
#: roads): field 0 picks the land-use colour, 1 is texture, 2 draws roads.
_WEIGHTS = (
    (0.55, 0.25, 0.13, 0.07),
    (0.10, 0.18, 0.26, 0.26, 0.20),
    (0.70, 0.25, 0.05),
)
_ROAD_HALF_WIDTH = 0.018
_GEMM_ROWS = 16

# 64-bit mixing constants (splitmix64 / murmur3 finaliser).
_K1 = 0x9E3779B97F4A7C15
_K2 = 0xC2B2AE3D27D4EB4F
_M1 = 0xFF51AFD7ED558CCD
_M2 = 0xC4CEB9FE1A85EC53


def _hash01(gx: Any, gy: Any, seeds: Any) -> Any:
    """Uniform floats in [0, 1), one per lattice point and seed (broadcast).

    Arrays only: numpy wraps uint64 overflow silently for arrays (which is
    the point here) but warns for scalars.
    """
    import numpy as np

    h = gx.astype(np.uint64) * np.uint64(_K1) + gy.astype(np.uint64) * np.uint64(_K2)
    h = h + seeds.astype(np.uint64)
    h ^= h >> np.uint64(33)
    h *= np.uint64(_M1)
    h ^= h >> np.uint64(33)
    h *= np.uint64(_M2)
    h ^= h >> np.uint64(33)
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _weights(cell: int, size: int, phase: int) -> Any:
    """Smoothstep weights from ``size`` pixels onto the lattice under them.

    ``phase`` is the first pixel's global coordinate modulo ``cell``.  The
    matrix is ``size x n`` with two non-zeros a row.
    """
    import numpy as np

    g = (phase + np.arange(size, dtype=np.float64) + 0.5) / cell
    i0 = np.floor(g).astype(np.int64)
    f = g - i0
    s = f * f * (3.0 - 2.0 * f)
    w = np.zeros((size, int(i0[-1]) + 2), dtype=np.float32)
    rows = np.arange(size)
    w[rows, i0] = 1.0 - s
    w[rows, i0 + 1] = s
    return w


@functools.lru_cache(maxsize=64)
def _weights_all(
    size: int, phases: tuple[int, ...]
) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[int, ...]]:
    """Every octave's weights side by side, for each field's octaves.

    Returns ``(W, W.T, block widths)``: per field the ``size x n`` matrix of
    its octaves' weights and its transpose (contiguous), and the width of
    each octave's block.  The same for every tile whose origin has these
    phases (modulo each cell), which is all of them when the cells divide
    ``size``.
    """
    import numpy as np

    blocks = [_weights(cell, size, ph) for cell, ph in zip(_CELLS, phases)]
    full = np.concatenate(blocks, axis=1)
    widths = tuple(b.shape[1] for b in blocks)
    ws, wts = [], []
    for weights in _WEIGHTS:
        n = sum(widths[: len(weights)])
        w = np.ascontiguousarray(full[:, :n])
        w_t = np.ascontiguousarray(w.T)
        w.setflags(write=False)
        w_t.setflags(write=False)
        ws.append(w)
        wts.append(w_t)
    return tuple(ws), tuple(wts), widths


@functools.lru_cache(maxsize=64)
def _lattice_layout(
    widths_x: tuple[int, ...], widths_y: tuple[int, ...]
) -> tuple[Any, Any, Any, tuple[Any, ...]]:
    """Every lattice point under a tile, all octaves in one flat list.

    Returns ``(octave, col, row, per_field)``: for each point its octave and
    its column and row within that octave's block; for each field, where
    its points (the first ones: the list runs coarse to fine) go in its
    flattened block-diagonal lattice matrix, with that matrix's shape.
    """
    import numpy as np

    octave, col, row = [], [], []
    for o, (wdx, wdy) in enumerate(zip(widths_x, widths_y)):
        rr, cc = np.meshgrid(np.arange(wdy), np.arange(wdx), indexing="ij")
        octave.append(np.full(wdx * wdy, o))
        col.append(cc.ravel())
        row.append(rr.ravel())
    oct_a, col_a, row_a = (np.concatenate(v) for v in (octave, col, row))
    per_field = []
    for weights in _WEIGHTS:
        k = len(weights)
        count = sum(wx * wy for wx, wy in zip(widths_x[:k], widths_y[:k]))
        nx, ny = sum(widths_x[:k]), sum(widths_y[:k])
        ox = np.cumsum((0,) + widths_x)[oct_a[:count]]
        oy = np.cumsum((0,) + widths_y)[oct_a[:count]]
        dest = (oy + row_a[:count]) * nx + ox + col_a[:count]
        per_field.append((count, ny, nx, dest))
    return oct_a, col_a, row_a, tuple(per_field)


@functools.lru_cache(maxsize=1)
def _field_tables() -> tuple[Any, Any]:
    """Per (field, octave): the seed's zoom-independent part, and the weight (0 if unused)."""
    import numpy as np

    base = np.zeros((len(_WEIGHTS), len(_CELLS)), dtype=np.int64)
    weight = np.zeros((len(_WEIGHTS), len(_CELLS)), dtype=np.float32)
    for f, weights in enumerate(_WEIGHTS):
        for o in range(len(_CELLS)):
            base[f, o] = o * 101 + f * 7 + SYNTHETIC_VERSION
        weight[f, : len(weights)] = weights
    return base, weight


_scratch_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: str) -> Any:
    """A per-thread buffer, reused from call to call.

    Fresh large temporaries cost a page fault per 4 KiB on every call
    (glibc maps them anew): in a VM that made rendering 2.5x slower
    (measured: 1.9 M faults for 3,000 tiles).  So the big arrays live here.
    """
    import numpy as np

    arrays: dict[str, Any] | None = getattr(_scratch_local, "arrays", None)
    if arrays is None:
        arrays = _scratch_local.arrays = {}
    a = arrays.get(name)
    if a is None or a.shape != shape or a.dtype != np.dtype(dtype):
        a = arrays[name] = np.empty(shape, dtype=dtype)
    return a


def _matmul_by_rows(a: Any, b: Any, out: Any, rows: int = _GEMM_ROWS) -> Any:
    """``a @ b`` into ``out``, as a stack of ``rows``-row products.

    OpenBLAS runs a product this size on every core; on a busy machine, or
    under the fetcher's thread pool, that was 20x slower (measured) than the
    same work as small single-threaded products.  numpy loops over the
    stack in C, one BLAS call per slice.
    """
    import numpy as np

    m, k = a.shape
    n = b.shape[1]
    if m % rows:
        return np.matmul(a, b, out=out)
    np.matmul(a.reshape(m // rows, rows, k), b, out=out.reshape(m // rows, rows, n))
    return out


def _fields(t: Tile, size: int) -> Any:
    """The three noise fields of tile ``t``, shape ``(3, size, size)``, in ~[0, 1].

    With ``Wy``, ``Wx`` every octave's weights side by side and ``B`` the
    block-diagonal matrix of (weighted) lattice values, a field is
    ``Wy @ B @ Wx.T``: two matrix products a field for all its octaves.
    The result is a per-thread buffer, overwritten by the next call.
    """
    import numpy as np

    z, x, y = int(t.z), int(t.x), int(t.y)
    x0, y0 = x * size, y * size
    world = (1 << z) * size
    _, wx_t, widths_x = _weights_all(size, tuple((x0 + o) % c for c, o in zip(_CELLS, _OFFSETS_X)))
    wy, _, widths_y = _weights_all(size, tuple((y0 + o) % c for c, o in zip(_CELLS, _OFFSETS_Y)))
    octave, col, row, per_field = _lattice_layout(widths_x, widths_y)
    base_x = np.array([(x0 + o) // c for c, o in zip(_CELLS, _OFFSETS_X)], dtype=np.int64)
    base_y = np.array([(y0 + o) // c for c, o in zip(_CELLS, _OFFSETS_Y)], dtype=np.int64)
    # the world wraps: a shift moves both ends alike when the cell divides it
    cells_x = np.array([-(-world // c) for c in _CELLS], dtype=np.int64)
    gx = (base_x[octave] + col) % cells_x[octave]
    gy = base_y[octave] + row
    seed_base, weight = _field_tables()
    seeds = (seed_base + z * 1_000_003) * 0x1000193
    values = _hash01(gx[None, :], gy[None, :], seeds[:, octave]) * weight[:, octave]
    out = _scratch("fields", (3, size, size), "float32")
    for f, (count, ny, nx, dest) in enumerate(per_field):
        lattice = np.zeros(ny * nx, dtype=np.float32)
        lattice[dest] = values[f, :count]
        left = _matmul_by_rows(
            wy[f], lattice.reshape(ny, nx), _scratch("left", (size, nx), "float32")
        )
        _matmul_by_rows(left, wx_t[f], out[f])
    return out


@functools.lru_cache(maxsize=1)
def _palette() -> Any:
    """256 land-use colours (RGB, float32), indexed by the quantised field value."""
    import numpy as np

    base = np.array(
        [
            (74, 98, 52),  # forest
            (118, 138, 70),  # meadow
            (160, 150, 96),  # dry grass
            (186, 168, 120),  # stubble
            (128, 104, 78),  # ploughed
            (96, 120, 60),  # crop
            (150, 154, 140),  # built-up
            (64, 84, 92),  # water-ish
        ],
        dtype=np.float32,
    )
    v = np.arange(256, dtype=np.float32) / 255.0
    # soft quantisation: 8 patches, each blending into the next over 6 % of it
    k = len(base)
    pos = v * (k * 1.6)
    idx = np.floor(pos).astype(np.int64)
    frac = pos - idx
    blend = np.clip((frac - 0.94) / 0.06, 0.0, 1.0)[:, None]
    a = base[idx % k]
    b = base[(idx + 1) % k]
    return (a * (1.0 - blend) + b * blend).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _palette_planar() -> Any:
    """:func:`_palette` as ``(3, 256)``, read-only."""
    import numpy as np

    p = np.ascontiguousarray(_palette().T)
    p.setflags(write=False)
    return p


def render_tile(t: Tile, size: int = DEFAULT_TILE_SIZE) -> Any:
    """The synthetic image of tile ``t`` as a ``size x size x 3`` uint8 array.

    Parameters
    ----------
    t
        The tile (any object with integer ``x``, ``y``, ``z``).
    size
        Tile edge in pixels.

    Returns
    -------
    numpy.ndarray
        ``(size, size, 3)`` uint8, RGB.

    >>> from cachebuild.tilemath import Tile
    >>> img = render_tile(Tile(1, 2, 3))
    >>> img.shape, img.dtype.name
    ((256, 256, 3), 'uint8')
    """
    import numpy as np

    return np.array(_image(t, size))


def _image(t: Tile, size: int) -> Any:
    """The tile as a Pillow RGB image.

    numpy interleaves planes slowly (0.36 ms a tile, measured); Pillow's
    merge does it in a quarter of that.
    """
    from PIL import Image

    planes = _render_planes(t, size)
    return Image.merge("RGB", [Image.fromarray(p) for p in planes])


def _render_planes(t: Tile, size: int) -> Any:
    """The tile as ``(3, size, size)`` uint8 planes, in a per-thread buffer."""
    import numpy as np

    if size <= 0:
        raise ValueError(f"tile size must be positive, not {size}")
    landuse, texture, road = _fields(t, size)
    # planar (3, H, W) while computing: broadcasting over a trailing axis of
    # 3 is several times slower
    work = _scratch("work", (size, size), "float32")
    index = _scratch("index", (size, size), "intp")
    np.multiply(landuse, np.float32(255.0), out=work)
    np.clip(work, 0.0, 255.0, out=work)
    np.copyto(index, work, casting="unsafe")
    rgb = _scratch("rgb", (3, size, size), "float32")
    np.take(_palette_planar(), index, axis=1, out=rgb, mode="clip")
    np.multiply(texture, np.float32(0.9), out=work)
    work += np.float32(0.55)
    rgb *= work
    # roads: a band around the 0.5 contour of a smooth field, soft-edged
    np.subtract(road, np.float32(0.5), out=work)
    np.abs(work, out=work)
    work *= np.float32(-1.0 / _ROAD_HALF_WIDTH)
    work += np.float32(1.5)
    np.clip(work, 0.0, 1.0, out=work)
    shade = _scratch("shade", (3, size, size), "float32")
    np.subtract(np.float32(200.0), rgb, out=shade)
    shade *= work
    rgb += shade
    np.clip(rgb, 0.0, 255.0, out=rgb)
    out = _scratch("rgb8", (3, size, size), "uint8")
    np.copyto(out, rgb, casting="unsafe")
    return out


def synthetic_tile_bytes(
    t: Tile, quality: int = DEFAULT_QUALITY, size: int = DEFAULT_TILE_SIZE
) -> bytes:
    """The synthetic tile ``t`` encoded as JPEG.

    The same bytes on every call with the same numpy and Pillow.

    Parameters
    ----------
    t
        The tile.
    quality
        JPEG quality, 1-95.
    size
        Tile edge in pixels.

    >>> from cachebuild.tilemath import Tile
    >>> synthetic_tile_bytes(Tile(0, 0, 0))[:3]
    b'\\xff\\xd8\\xff'
    """
    import io

    buf = io.BytesIO()
    _image(t, size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
