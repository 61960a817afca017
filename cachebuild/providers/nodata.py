"""A provider's "no data" tiles: images that stand for a gap, not imagery.

Many providers answer a tile they have no imagery for with an image anyway:
a flat grey or white square, a fully transparent PNG, or a picture saying
"no imagery here".  Stored as tiles they would pass every check and end up
described and indexed as if they were terrain.  With a rule set, such a tile
counts as *missing*, exactly as a 404 does: it is not stored, the coverage
check counts it, and the provider is asked for it again next time.

Two rules, either or both:

``NODATA=uniform``
    The image is one flat colour: the standard deviation of every band is at
    most :data:`UNIFORM_MAX_STDDEV` levels (of 0..255), which lets through
    the noise lossy WebP and JPEG add to a flat tile (measured: under 1
    level at quality 50) and nothing that shows any ground; or the image is
    fully transparent.  Checked on the fully decoded image (a reduced-scale
    decode would average fine texture away).
``NODATA_SHA256=<hex>,<hex>…``
    The SHA-256 of the tile's bytes is one of these: a provider's own
    placeholder image, whatever it shows.

Pillow is imported when an image is checked.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass

from cachebuild._util.hashing import is_sha256_hex
from cachebuild.errors import UsageError

__all__ = ["NODATA_MODES", "UNIFORM_MAX_STDDEV", "UNIFORM_CHECK", "NoDataRule", "is_uniform"]

#: Values ``NODATA`` takes.
NODATA_MODES = ("off", "uniform")
#: Largest standard deviation (levels of 0..255) of any band of a "uniform" image.
UNIFORM_MAX_STDDEV = 1.0
#: Name of the uniform check's cached verdicts in the tile store; change it
#: when the check changes, so old verdicts are not trusted.
UNIFORM_CHECK = f"uniform-sd{UNIFORM_MAX_STDDEV:g}-v1"


def is_uniform(data: bytes, max_stddev: float = UNIFORM_MAX_STDDEV) -> bool:
    """True when the image in ``data`` is one flat colour or fully transparent.

    Bytes that do not decode are not uniform (the image check reports them).

    >>> import io; from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (256, 256), (200, 200, 200)).save(buf, "PNG")
    >>> is_uniform(buf.getvalue())
    True
    """
    from PIL import Image, ImageStat

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                # palette, 16-bit, CMYK...: compare colours, not indices
                im = im.convert("RGBA")
            bands = im.getbands()
            if "A" in bands:
                alpha = im.getchannel("A")
                if alpha.getextrema()[1] == 0:
                    return True  # fully transparent, whatever colour it hides
                im = im.convert("RGB" if len(bands) == 4 else "L")
            stddev = ImageStat.Stat(im).stddev
    except (OSError, SyntaxError, ValueError, EOFError):
        return False
    return all(sd <= max_stddev for sd in stddev)


@dataclass(frozen=True)
class NoDataRule:
    """Which tiles count as missing although the provider served an image.

    Attributes
    ----------
    uniform
        A one-colour or fully transparent image is no data.
    sha256
        Hex SHA-256 digests of known no-data tiles.
    """

    uniform: bool = False
    sha256: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        return self.uniform or bool(self.sha256)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NoDataRule:
        """Read ``NODATA`` and ``NODATA_SHA256``; UsageError names a bad value.

        >>> NoDataRule.from_env({"NODATA": "uniform"}).uniform
        True
        >>> NoDataRule.from_env({}).active
        False
        """
        mode = (env.get("NODATA") or "off").strip().lower()
        if mode not in NODATA_MODES:
            raise UsageError(
                f"NODATA={env.get('NODATA')!r} must be one of {', '.join(NODATA_MODES)}",
                remedy="NODATA=uniform counts one-colour tiles as missing; "
                "NODATA_SHA256 lists the hashes of a provider's blank tiles",
            )
        digests = set()
        for part in (env.get("NODATA_SHA256") or "").replace(" ", ",").split(","):
            part = part.strip().lower()
            if not part:
                continue
            if not is_sha256_hex(part):
                raise UsageError(
                    f"NODATA_SHA256: {part[:80]!r} is not a SHA-256 (64 hex digits)",
                    remedy="list the SHA-256 of each blank tile's bytes (sha256sum blank.png), comma-separated",
                )
            digests.add(part)
        return cls(uniform=mode == "uniform", sha256=frozenset(digests))

    def as_value(self) -> dict[str, object]:
        """A JSON-able form, for the tiles task's dependencies and the summary.

        >>> NoDataRule(uniform=True).as_value()
        {'uniform': True, 'sha256': []}
        """
        return {"uniform": self.uniform, "sha256": sorted(self.sha256)}

    def matches(self, data: bytes, digest: str | None = None) -> bool:
        """True when ``data`` (whose hex SHA-256 is ``digest``, if known) is no data."""
        if self.sha256:
            if digest is None:
                digest = hashlib.sha256(data).hexdigest()
            if digest in self.sha256:
                return True
        return self.uniform and is_uniform(data)
