"""A tile server whose imagery changes: :class:`TileServer` plus ``ETag``,
``Last-Modified`` and conditional requests (304), for the revalidation tests
and bench/bench_flow.py.

:meth:`EtagServer.change` gives a tile new imagery (its bytes, ETag and
Last-Modified change); :attr:`EtagServer.downloads` and
:attr:`EtagServer.not_modified` count, per tile, the whole images sent and
the 304s, server-side.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from email.utils import formatdate
from typing import Any

from cachebuild.tilemath import Tile
from tests._harness.tileserver import Reply, TileServer, tile_bytes

__all__ = ["EtagServer", "changed_bytes"]

_EPOCH = 1_700_000_000.0


def changed_bytes(t: Tile, version: int) -> bytes:
    """The image of ``t`` at ``version`` (0: the original): a JPEG comment makes it differ."""
    base = tile_bytes(t)
    if version == 0:
        return base
    note = f"v{version}".encode()
    return base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]


class EtagServer(TileServer):
    """A :class:`TileServer` that validates: ``etags`` and/or ``last_modified`` on its answers."""

    def __init__(self, *, etags: bool = True, last_modified: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.etags = etags
        self.last_modified = last_modified
        self.version: dict[Tile, int] = {}
        self.downloads: Counter[Tile] = Counter()
        self.not_modified: Counter[Tile] = Counter()
        self.conditional: Counter[str] = Counter()  # which header asked

    def change(self, t: Tile) -> bytes:
        """New imagery for ``t``; returns its bytes."""
        with self.lock:
            self.version[t] = self.version.get(t, 0) + 1
            return changed_bytes(t, self.version[t])

    def _validators(self, t: Tile, body: bytes) -> dict[str, str]:
        out = {}
        if self.etags:
            out["ETag"] = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        if self.last_modified:
            out["Last-Modified"] = formatdate(_EPOCH + 86400 * self.version.get(t, 0), usegmt=True)
        return out

    def _answer(self, path: str, query: str, headers: dict[str, str], t: Tile | None) -> Reply:
        reply = super()._answer(path, query, headers, t)
        if reply.status != 200 or t is None:
            return reply
        with self.lock:
            body = changed_bytes(t, self.version.get(t, 0))
        valid = self._validators(t, body)
        inm, ims = headers.get("if-none-match"), headers.get("if-modified-since")
        with self.lock:
            if inm is not None:
                self.conditional["If-None-Match"] += 1
            elif ims is not None:
                self.conditional["If-Modified-Since"] += 1
            same = (inm is not None and inm == valid.get("ETag")) or (
                inm is None and ims is not None and ims == valid.get("Last-Modified")
            )
            if same:
                self.not_modified[t] += 1
                return Reply(304, b"", valid)
            self.downloads[t] += 1
        return Reply(200, body, {"Content-Type": "image/jpeg", **valid})
