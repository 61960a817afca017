"""Byte counts for people: the one formatter every message and table uses."""

from __future__ import annotations

__all__ = ["human_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """``n`` bytes in powers of 1024, as ``MAX_STORE_BYTES`` reads them: whole bytes, else one decimal.

    >>> human_bytes(0), human_bytes(1023), human_bytes(1536), human_bytes(21474836480)
    ('0 B', '1023 B', '1.5 KiB', '20.0 GiB')
    """
    for unit in _UNITS[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {_UNITS[-1]}"
