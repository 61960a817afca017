"""Every variable a command reads, with its one-line help (``doit help build-cache``, docs/configuration.md).

Kept apart from :mod:`cachebuild.inputs.config`, which parses and checks them.
"""

from __future__ import annotations

__all__ = ["VARIABLES"]

#: Every variable a command reads, with its one-line help (docs/configuration.md).
VARIABLES: dict[str, str] = {
    "FLIGHT": "flight plan JSON file, or a flight id (UUID) looked up at FLIGHTS_API_URL "
    "(required for build-cache)",
    "FLIGHTS_API_URL": "base URL of the Flights API (token from the FLIGHTS_API_TOKEN environment variable)",
    "FLIGHTS_API_TIMEOUT": "seconds to wait for the Flights API [default: 10]",
    "OFFLINE": "1: resolve a flight id from the answer saved by the last online build [default: 0]",
    "CACHE_DIR": "where the build state and the published cache live [default: $CACHEBUILD_HOME/cache]",
    "STORE": "content-addressed tile store shared by every cache: a directory, or s3://bucket/prefix "
    "shared by every machine (local copy in $CACHEBUILD_HOME/store; docs/scale.md) "
    "[default: $CACHEBUILD_HOME/store]",
    "ZOOM": "zoom level(s), e.g. 17 or 16,17 [default: 17]",
    "BUFFER_M": "metres added around the route on every side [default: 500]",
    "MAX_TILES": "refuse an area of more tiles than this, before any download (exit 2) [default: 1000000]",
    "PROVIDER": "synthetic | URL template with {z}/{x}/{y} ({-y}, {q}, {s}, {key}) | file.mbtiles | "
    "tile directory (dir:/path/{z}/{x}/{-y}.png) | GeoTIFF (.tif) [default: synthetic]",
    "CONCURRENCY": "tile requests in flight [default: 8]",
    "HTTP_TIMEOUT": "seconds per tile request [default: 20]",
    "HTTP_DEADLINE": "seconds a tile request may take in all, however slowly the server sends [default: 60]",
    "HTTP_RETRIES": "retries per tile after a connection error, timeout, 5xx or 429 [default: 3]",
    "HTTP_BACKOFF": "first retry delay in seconds, doubled each retry, with jitter [default: 0.2]",
    "RATE_LIMIT": "at most this many tile requests a second, retries included; 0: no limit [default: 0]",
    "TILE_MAX_AGE": "ask if stored tiles older than this changed, e.g. 30d; 0: all [default: never]",
    "FETCH_DEADLINE": "how long the tiles phase may keep asking, e.g. 6h; 0: no limit [default: 6h]",
    "SUBDOMAINS": "values {s} in the URL template rotates through, e.g. a,b,c [default: a,b,c]",
    "NODATA": "off | uniform: a one-colour or fully transparent tile counts as missing [default: off]",
    "NODATA_SHA256": "SHA-256s of a provider's blank tiles, comma-separated: they count as missing "
    "[default: none]",
    "RETRY_MISSING": "1: ask the provider again for tiles it had none of last time [default: 0]",
    "MODEL": "descriptor network, an ONNX file [default: the built-in cbnet-v2]",
    "CALIBRATION": "calibration file, part of the engine key [default: none]",
    "PRECISION": "fp32 | fp16 | int8 [default: fp32]",
    "BACKEND": "auto | tensorrt | onnxruntime: auto takes TensorRT where it is installed and a GPU "
    "is present, else ONNX Runtime (docs/gpu.md) [default: auto]",
    "WORKSPACE": "TensorRT builder workspace limit, e.g. 512M; part of a TensorRT engine's key [default: 1G]",
    "BATCH": "descriptor batch size [default: 64]",
    "THREADS": "inference threads [default: all cores]",
    "DASK_SCHEDULER": "tcp://host:port: describe on that Dask cluster; local:N: on N worker processes "
    "here (docs/scale.md) [default: in the build's process]",
    "PIPELINE": "1: describe the tiles while they are fetched (the engine is compiled first); "
    "0: one phase after another (docs/design/pipeline.md) [default: 1]",
    "KEY": "Ed25519 signing key (PEM or OpenSSH) [default: a per-user development key]",
    "PUBKEY": "public key verify-cache trusts [default: the public half of KEY]",
    "ALLOW_DEV_KEY": "1: sign with the development key a cache whose published release another key "
    "signed [default: 0: refused]",
    "EXPIRES_DAYS": "days until the manifest expires [default: 30]",
    "STRICT": "1: a coverage gap fails the build (exit 22); 0: warn and publish [default: 1]",
    "INDEX": "auto | flat | hnsw | ivf: the FAISS index; auto picks by tile count [default: auto]",
    "WINDOW_STRIDE": "1 | 2 | 4 | 8: indexed windows per tile side; 1: one per tile (docs/design/"
    "windows.md) [default: 4]",
    "SELFTEST_QUERIES": "camera-like frames the localisation self-test searches; 0: no self-test "
    "[default: 200]",
    "MIN_RECALL": "self-test recall@1 below this fails the build (exit 22), e.g. 0.9 [default: no gate]",
    "RECALL_WARN": "self-test recall@1 below this warns (stderr and report) [default: 0.9]",
    "MAX_STORE_BYTES": "gc-store: shrink the store to this size (e.g. 20G), keeping what every cache "
    "uses [default: remove everything unused]",
    "REPORT": "text | json: json prints one JSON object as the last stdout line [default: text]",
    "COMPANION": "user@host[:port]: build on the companion over SSH; this machine fetches and pushes "
    "(docs/companion.md) [default: build here]",
    "SSH_KEY": "private key for the companion [default: ~/.ssh/id_ed25519, id_ecdsa or id_rsa]",
    "KNOWN_HOSTS": "OpenSSH known_hosts file the companion's host key must be in [default: ~/.ssh/known_hosts]",
    "HOST_KEY_POLICY": "reject | accept-new: trust and record an unknown companion host key [default: reject]",
    "COMPANION_DIR": "the cache root on the companion: store, cache, pushed files "
    "[default: ~/.cache/cachebuild]",
    "COMPANION_CMD": "how to run cachebuild's doit on the companion [default: doit]",
    "COMPANION_KEY": "signing key's path on the companion (KEY stays on this machine) "
    "[default: the companion's own]",
}
