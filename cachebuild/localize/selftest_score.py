"""Scoring the self-test's frames: hits by ground overlap, position error in metres, verdicts.

A frame is a rotated, rescaled square of ground; a search result is a
place (:mod:`cachebuild.localize.places`).  A result is a *hit* when at
least :data:`MIN_OVERLAP` of the frame's ground lies inside the place's
footprint, measured on a :data:`_GRID` x :data:`_GRID` lattice of points
spread over the frame.  The position error of a frame is the ground
distance from its centre to the centre of its first result, in metres
(a frame with no result counts as infinitely far).

The human lines (the build's summary, ``cache-info``, the coverage map)
come from :func:`headline`, so they say the same thing; fewer than
:data:`MIN_FRAMES` frames give no figure at all.

numpy is imported inside the functions.
"""

from __future__ import annotations

import math
from typing import Any

from cachebuild.localize.places import metres_per_unit, place_boxes

__all__ = [
    "MIN_OVERLAP",
    "MIN_FRAMES",
    "DEFAULT_RECALL_WARN",
    "frame_points",
    "score",
    "headline",
    "low_recall_warning",
]

#: A result is a hit when this share of the frame's ground lies in its footprint.
MIN_OVERLAP = 0.5
#: Fewer frames than this give no figure ("too few frames").
MIN_FRAMES = 50
#: recall@1 below this warns (``RECALL_WARN``); ``MIN_RECALL`` is the gate.
DEFAULT_RECALL_WARN = 0.9
_GRID = 16


def frame_points(x: Any, y: Any, params: Any) -> tuple[Any, Any, Any, Any]:
    """Frame centres and footprint lattices in tile units.

    ``x``, ``y``: the integer tile coordinates of each frame's middle tile;
    ``params``: ``[n, 6]`` (centre shift x, y; turn; scale; gain; bias) as
    drawn by :func:`cachebuild.localize.selftest._draw`.  Returns
    ``(cx, cy, px, py)``: centres ``[n]`` and lattice points ``[n, G*G]``.
    """
    import numpy as np

    p = np.asarray(params, dtype=np.float64).reshape(-1, 6)
    cx = np.asarray(x, dtype=np.float64) + 0.5 + p[:, 0]
    cy = np.asarray(y, dtype=np.float64) + 0.5 + p[:, 1]
    g = (np.arange(_GRID) + 0.5) / _GRID - 0.5  # over a frame of side 1 (x scale)
    u, v = (a.ravel() for a in np.meshgrid(g, g))
    cos, sin, s = np.cos(p[:, 2:3]), np.sin(p[:, 2:3]), p[:, 3:4]
    px = cx[:, None] + s * (cos * u - sin * v)
    py = cy[:, None] + s * (sin * u + cos * v)
    return cx, cy, px, py


def _overlap(found: Any, px: Any, py: Any) -> Any:
    """``[n, k]``: the share of each frame's lattice inside each result's footprint."""
    import numpy as np

    z, x0, y0 = place_boxes(np.maximum(found, 0))
    side = np.power(2.0, z)
    dx = np.mod(px[:, None, :] - x0[:, :, None], side[:, :, None])  # wraps at the antimeridian
    dy = py[:, None, :] - y0[:, :, None]
    inside = (dx < 1.0) & (dy >= 0.0) & (dy < 1.0)
    share = inside.mean(axis=2)
    return np.where(found >= 0, share, 0.0)


def _errors_m(found: Any, cx: Any, cy: Any, z_frame: Any) -> Any:
    """Metres from each frame's centre to its first result's centre (inf without one)."""
    import numpy as np

    z, x0, y0 = place_boxes(np.maximum(found[:, 0], 0))
    side = np.power(2.0, z)
    dx = np.mod(x0 + 0.5 - cx + side / 2, side) - side / 2
    dy = y0 + 0.5 - cy
    lat = np.degrees(np.arctan(np.sinh(math.pi * (1.0 - 2.0 * cy / np.power(2.0, z_frame)))))
    metres = np.hypot(dx, dy) * metres_per_unit(lat, z)
    return np.where((found[:, 0] >= 0) & (z == z_frame), metres, np.inf)


def _round_m(v: float) -> float | None:
    return None if not math.isfinite(v) else round(v, 1)


def score(found: Any, x: Any, y: Any, z: Any, params: Any) -> dict[str, Any]:
    """recall@1, recall@5, median and p95 position error (m) and the frame count.

    ``found``: ``[n, k]`` result ids (-1: none); ``x``, ``y``, ``z``: each
    frame's middle tile; ``params``: the frames' parameters.
    """
    import numpy as np

    found = np.asarray(found, dtype=np.int64)
    n = len(found)
    out: dict[str, Any] = {
        "frames": n,
        "recall_at_1": None,
        "recall_at_5": None,
        "median_error_m": None,
        "p95_error_m": None,
    }
    if not n:
        return out
    cx, cy, px, py = frame_points(x, y, params)
    hit = _overlap(found, px, py) >= MIN_OVERLAP
    err = _errors_m(found, cx, cy, np.asarray(z, dtype=np.float64))
    out["recall_at_1"] = round(float(hit[:, 0].mean()), 4)
    out["recall_at_5"] = round(float(hit[:, :5].any(axis=1).mean()), 4)
    out["median_error_m"] = _round_m(float(np.quantile(err, 0.5, method="lower")))
    out["p95_error_m"] = _round_m(float(np.quantile(err, 0.95, method="higher")))
    return out


def headline(info: dict[str, Any] | None) -> str:
    """One line for people: recall and error of frames centred anywhere, or why there is none."""
    info = info or {}
    n = int(info.get("queries") or 0)
    if not n or info.get("recall_at_1") is None:
        return "not run (no frame could be made, or SELFTEST_QUERIES=0)"
    if n < MIN_FRAMES:
        return f"too few frames for a figure ({n} < {MIN_FRAMES} frames)"
    med, p95 = info.get("median_error_m"), info.get("p95_error_m")
    err = (
        f"error median {med:.0f} m, p95 {p95:.0f} m"
        if med is not None and p95 is not None
        else f"error median {'inf' if med is None else f'{med:.0f} m'}, p95 inf"
    )
    line = (
        f"recall@1 {float(info['recall_at_1']):.3f}, recall@5 "
        f"{float(info['recall_at_5']):.3f}, {err}, frames centred anywhere ({n} frames)"
    )
    first = info.get("stage1")
    if isinstance(first, dict) and first.get("recall_at_1") is not None:
        line += (
            f"; the index alone (before re-ranking) recall@1 {float(first['recall_at_1']):.3f}, "
            f"recall@5 {float(first['recall_at_5']):.3f}"
        )
    return line


def low_recall_warning(info: dict[str, Any] | None, warn_at: float | None) -> str | None:
    """The warning when recall@1 is below ``warn_at`` (None: none, or too few frames to say)."""
    info = info or {}
    r1 = info.get("recall_at_1")
    if warn_at is None or r1 is None or int(info.get("queries") or 0) < MIN_FRAMES:
        return None
    if float(r1) >= warn_at:
        return None
    med = info.get("median_error_m")
    return (
        f"self-test: recall@1 {float(r1):.3f} is below RECALL_WARN={warn_at:g} "
        f"({info.get('queries')} frames centred anywhere, median error "
        f"{'inf' if med is None else f'{float(med):.0f} m'}): the drone may not find where it "
        "is over this area"
    )
