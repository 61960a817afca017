"""cachebuild: build the signed onboard map cache for a GPS-denied flight.

The rooms, top to bottom; a room imports only from rooms below it
(pyproject.toml's import-linter contracts, checked in CI)::

    cli/          the doit commands and the wrapper around a build: lock,
                  report, exit codes (runner, doitcmds, doitrun, console, info,
                  repair, logsetup)
    ../targets/   one doit task per artifact, and the actions they run
    companion/    companion mode: push over SSH, build on the Jetson
    localize/     describe (decode, Dask, S3 batches), the index, the self-test
    tiles/        the fetch phase, the MBTiles file, the coverage map
    engine/       interface and key, backend choice, ONNX Runtime, TensorRT,
                  the built-in model
    release/      manifest, signing, verification, rollback, publish, the cache
                  lock, gc
    inputs/       settings, the flight, the Flights API, the area guard, the
                  resolved plan
    store/        the content-addressed store: objects, locks, descriptors,
                  thumbnails, S3, the action cache
    providers/    where tiles come from: XYZ, MBTiles, directory, GeoTIFF,
                  synthetic, pushed; no-data rules, rate limit
    _util/        files (one atomic writer; kernel copy and writeback), hashing,
                  statcache, CPUs, .npy, progress, HTTP safety, retry policy,
                  report, byte sizes, installed versions, warnings
    errors.py     the error tree and its exit codes
    tilemath.py   Web-Mercator tile math
    tileset.py    the tile set files of a build (which tiles, by hash)

Only cli/ and targets/ import doit.  docs/design/architecture.md explains the
layers and where each kind of change goes.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
