"""What one fetch worker does for one tile: fetch it, check it, or revalidate it.

Three kinds of work (:func:`work`):

- fetch a tile the store lacks, store it, journal its ref;
- check a stored tile against the no-data rule (``NODATA=uniform``);
- revalidate a stored tile older than ``TILE_MAX_AGE`` with a conditional
  request (``If-None-Match`` with its ``ETag``, else ``If-Modified-Since``):
  a 304, or the same bytes, keeps it (*not modified*); new bytes are stored
  under their own hash and the tile's ref moves to them (*refreshed*).

A provider with ``fetch_validated`` (the XYZ provider) also hands back the
answer's ``ETag`` and ``Last-Modified``, which the fetch keeps in the store
with the time, so the next revalidation can be conditional.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from cachebuild.store.objects import sha256_hex
from cachebuild.tilemath import Tile

if TYPE_CHECKING:
    from cachebuild.providers.base import Provider
    from cachebuild.providers.nodata import NoDataRule
    from cachebuild.store.objects import RefJournal, TileStore

__all__ = ["Outcome", "Validators", "work", "NOT_MODIFIED", "REFRESHED"]

NOT_MODIFIED = "not_modified"
REFRESHED = "refreshed"

#: ``(etag, last_modified, fetched_at)`` of a stored tile; Nones when unknown.
Validators = tuple[str | None, str | None, float]


class Outcome(NamedTuple):
    """What a worker found for one tile."""

    tile: Tile
    digest: str | None  # None: the provider has no image for it
    blank: bool  # the no-data rule matched: missing, not stored
    reused: bool  # a stored object (checked, or revalidated unchanged), not fetched
    revalidated: str = ""  # NOT_MODIFIED or REFRESHED when the tile was revalidated
    etag: str | None = None  # the answer's validators, to keep (None: none given)
    last_modified: str | None = None
    validated: bool = False  # the provider gives validators: record them


def work(
    provider: Provider,
    store: TileStore,
    journal: RefJournal,
    rule: NoDataRule,
    t: Tile,
    known: str | None,
    validators: Validators | None = None,
) -> Outcome:
    """Fetch ``t`` and store it; with ``known``, check it against the rule, or revalidate it."""
    if known is not None and validators is not None:
        return _revalidate(provider, store, journal, rule, t, known, validators)
    if known is not None:
        return Outcome(t, known, rule.matches(store.get(known), known), True)
    fetch_validated = getattr(provider, "fetch_validated", None)
    if fetch_validated is None:
        return _keep(store, journal, rule, t, provider.fetch(t))
    got = fetch_validated(t)
    out = _keep(store, journal, rule, t, got.data)
    return out._replace(etag=got.etag, last_modified=got.last_modified, validated=True)


def _keep(
    store: TileStore, journal: RefJournal, rule: NoDataRule, t: Tile, data: bytes | None
) -> Outcome:
    if data is None:
        return Outcome(t, None, False, False)
    digest = sha256_hex(data)
    if rule.active and rule.matches(data, digest):
        return Outcome(t, digest, True, False)
    # journal first: a replay keeps only refs whose object is there, so a kill
    # between the two never leaves a stored object without its ref (refetched)
    journal.append((t.z, t.x, t.y), digest)
    store.put(data)
    return Outcome(t, digest, False, False)


def _revalidate(
    provider: Provider,
    store: TileStore,
    journal: RefJournal,
    rule: NoDataRule,
    t: Tile,
    known: str,
    validators: Validators,
) -> Outcome:
    etag, modified, _ = validators
    got = provider.fetch_validated(t, etag=etag, last_modified=modified)  # type: ignore[attr-defined]
    keep_etag = got.etag or etag
    keep_modified = got.last_modified or modified
    if got.not_modified or (got.data is not None and sha256_hex(got.data) == known):
        return Outcome(t, known, False, True, NOT_MODIFIED, keep_etag, keep_modified, True)
    out = _keep(store, journal, rule, t, got.data)
    if out.digest is None:
        return out  # gone from the provider: missing now
    return out._replace(
        revalidated=REFRESHED, etag=got.etag, last_modified=got.last_modified, validated=True
    )
