"""Settings for one run, read in one place from variables and the environment.

A value comes from, in order: the command line (``doit build-cache NAME=value``),
the environment (``CACHEBUILD_NAME``), the default below.  Secrets never come
from the command line (it shows in ``ps`` and shell history): the API key is
read from ``CACHEBUILD_API_KEY`` only, and is never stored here; so is a
signing key's passphrase (``CACHEBUILD_KEY_PASSPHRASE``, read by
:mod:`cachebuild.release.signing`).

Nothing is read at import time; :func:`load_settings` reads when called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachebuild.errors import UsageError, did_you_mean
from cachebuild.inputs.companion import parse_companion
from cachebuild.inputs.variables import VARIABLES
from cachebuild.providers.nodata import NoDataRule
from cachebuild.providers.xyzconfig import (
    parse_duration,
    parse_headers,
    parse_subdomains,
    refuse_userinfo,
)
from cachebuild.store.s3 import parse_store_url

__all__ = [
    "DEFAULT_BUFFER_M",
    "DEFAULT_ZOOMS",
    "DEFAULT_PROVIDER",
    "DEFAULT_PRECISION",
    "DEFAULT_BACKEND",
    "DEFAULT_BATCH",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_EXPIRES_DAYS",
    "DEFAULT_MAX_TILES",
    "VARIABLES",
    "ENV_ONLY",
    "parse_size",
    "parse_dask_scheduler",
    "Settings",
    "Paths",
    "load_settings",
    "cachebuild_home",
    "cachebuild_data_home",
]

DEFAULT_BUFFER_M = 500.0
DEFAULT_ZOOMS = (17,)
DEFAULT_PROVIDER = "synthetic"
DEFAULT_PRECISION = "fp32"
DEFAULT_BACKEND = "auto"
DEFAULT_BATCH = 64
DEFAULT_CONCURRENCY = 8
DEFAULT_EXPIRES_DAYS = 30
#: More tiles than this are refused before anything is fetched (cachebuild.inputs.area).
DEFAULT_MAX_TILES = 1_000_000
MAX_ZOOM = 22


def cachebuild_home(env: Mapping[str, str]) -> Path:
    """``$CACHEBUILD_HOME``, else ``$XDG_CACHE_HOME/cachebuild``, else ``~/.cache/cachebuild``."""
    if env.get("CACHEBUILD_HOME"):
        return Path(env["CACHEBUILD_HOME"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cachebuild"


def cachebuild_data_home(env: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/cachebuild``, else ``~/.local/share/cachebuild``: what must outlive the caches.

    The XDG rule written out (platformdirs is not a dependency, and would pick
    other places on macOS and Windows than the caches' ``~/.cache``); a
    relative ``XDG_DATA_HOME`` is invalid by the specification and ignored.
    """
    base = env.get("XDG_DATA_HOME") or ""
    if not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local", "share")
    return Path(base) / "cachebuild"


#: The development key's file name, in ``<data home>/keys/`` (before, in ``$CACHEBUILD_HOME/keys/``).
DEV_KEY_NAME = "dev_ed25519.pem"


@dataclass(frozen=True)
class Paths:
    """Where a cache's files live; all derived from ``cache_dir``.

    ``state/`` holds what only the builder needs (doit's database, the
    staged artifacts); ``current`` is a symlink to the published release,
    swapped atomically.
    """

    cache_dir: Path

    @property
    def lock(self) -> Path:
        return self.cache_dir / "build.lock"

    @property
    def state(self) -> Path:
        return self.cache_dir / "state"

    @property
    def dep_file(self) -> Path:
        return self.state / "doit.sqlite3"

    @property
    def build(self) -> Path:
        return self.state / "build"

    @property
    def releases(self) -> Path:
        return self.cache_dir / "releases"

    @property
    def current(self) -> Path:
        return self.cache_dir / "current"


@dataclass(frozen=True)
class Settings:
    """Everything one command needs, validated.  Immutable."""

    flight: str | None
    cache_dir: Path
    store: Path
    home: Path
    zooms: tuple[int, ...] = DEFAULT_ZOOMS
    buffer_m: float = DEFAULT_BUFFER_M
    max_tiles: int = DEFAULT_MAX_TILES
    provider: str = DEFAULT_PROVIDER
    concurrency: int = DEFAULT_CONCURRENCY
    retry_missing: bool = False
    http: Mapping[str, str] = field(default_factory=dict)
    nodata: Mapping[str, str] = field(default_factory=dict)
    model: Path | None = None
    calibration: Path | None = None
    precision: str = DEFAULT_PRECISION
    backend: str = DEFAULT_BACKEND
    workspace: int = 1 << 30
    batch: int = DEFAULT_BATCH
    threads: int | None = None
    dask_scheduler: str | None = None
    #: ``PIPELINE``: describe the tiles while they are fetched (docs/design/pipeline.md).
    pipeline: bool = True
    key: Path | None = None
    pubkey: Path | None = None
    allow_dev_key: bool = False
    expires_days: float = DEFAULT_EXPIRES_DAYS
    strict: bool = True
    index_kind: str = "auto"
    window_stride: int = 4
    selftest_queries: int = 200
    min_recall: float | None = None
    recall_warn: float = 0.9
    max_store_bytes: int | None = None
    report: str = "text"
    flights_api_url: str | None = None
    flights_api_timeout: float = 10.0
    offline: bool = False
    companion: str | None = None
    ssh_key: Path | None = None
    known_hosts: Path | None = None
    host_key_policy: str = "reject"
    companion_dir: str | None = None
    companion_cmd: str = "doit"
    companion_key: str | None = None
    #: ``STORE=s3://bucket/prefix`` (no credentials): the bucket shared by every
    #: machine; ``store`` is then the local copy.  None for a local store.
    shared_store: str | None = None
    #: The variables that were set (command line over environment), as given:
    #: what a companion build passes on.
    given: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def paths(self) -> Paths:
        return Paths(self.cache_dir)

    @property
    def dev_key(self) -> Path:
        """The development key in the data dir; the old one under ``$CACHEBUILD_HOME`` until a build moves it."""
        new = cachebuild_data_home(self.env) / "keys" / DEV_KEY_NAME
        return self.legacy_dev_key if not new.exists() and self.legacy_dev_key.exists() else new

    @property
    def legacy_dev_key(self) -> Path:
        """Where cachebuild kept the development key before: purged with the caches."""
        return self.home / "keys" / DEV_KEY_NAME


#: Variables also read from the environment under their own name (the
#: Flights API's are shared with other tools of the operator's).
PLAIN_ENV = ("FLIGHTS_API_URL", "FLIGHTS_API_TIMEOUT")


def _get(name: str, vars: Mapping[str, str], env: Mapping[str, str]) -> str | None:
    if name in vars and vars[name] is not None:
        return str(vars[name])
    value = env.get(f"CACHEBUILD_{name}")
    if value in (None, "") and name in PLAIN_ENV:
        value = env.get(name)
    return value if value not in (None, "") else None


def _int(name: str, raw: str | None, default: int, lo: int, hi: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise UsageError(f"{name}={value} is outside {lo}..{hi}")
    return value


def _float(name: str, raw: str | None, default: float, lo: float, hi: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number") from None
    if not (lo <= value <= hi):
        raise UsageError(f"{name}={raw} is outside {lo:g}..{hi:g}")
    return value


def _bool(name: str, raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{name}={raw!r} must be 1 or 0")


def _zooms(raw: str | None) -> tuple[int, ...]:
    if raw is None:
        return DEFAULT_ZOOMS
    out = set()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        out.add(_int("ZOOM", part, 0, 0, MAX_ZOOM))
    if not out:
        raise UsageError(f"ZOOM={raw!r} names no zoom level")
    return tuple(sorted(out))


def _companion(get: Any) -> dict[str, Any]:
    """COMPANION and its SSH settings, validated (docs/companion.md)."""
    out: dict[str, Any] = {}
    for name in ("COMPANION_DIR", "COMPANION_CMD", "COMPANION_KEY"):
        raw = get(name)
        if raw is not None and (not raw.strip() or "\n" in raw or "\0" in raw):
            shown = (
                "" if name == "COMPANION_CMD" else f"={raw!r}"
            )  # COMPANION_CMD may hold anything: never echoed
            raise UsageError(f"{name}{shown} must be one non-empty line")
        if raw is not None:
            out[name.lower()] = raw.strip()
    policy = (get("HOST_KEY_POLICY") or "reject").lower()
    if policy not in ("reject", "accept-new"):
        raise UsageError(f"HOST_KEY_POLICY={policy!r} must be reject or accept-new")
    companion = get("COMPANION")
    if companion is not None:
        parse_companion(companion)
        if get("KEY") is not None:
            raise UsageError(
                "KEY is a key on this machine, and with COMPANION the companion signs the cache: "
                "the private key is never sent",
                remedy="leave KEY (and CACHEBUILD_KEY) unset and set COMPANION_KEY=<path of the signing key "
                "on the companion> (docs/companion.md)",
            )
    known = get("KNOWN_HOSTS")
    out.update(
        companion=companion,
        ssh_key=_path("SSH_KEY", get("SSH_KEY"), must_exist=True),
        known_hosts=None if known is None else Path(known).expanduser().absolute(),
        host_key_policy=policy,
    )
    return out


def parse_dask_scheduler(raw: str) -> tuple[str, int | str]:
    """``("local", N)`` or ``("tcp", "tcp://host:port")`` from a ``DASK_SCHEDULER`` value.

    >>> parse_dask_scheduler("local:4"), parse_dask_scheduler("tcp://10.0.0.5:8786")
    (('local', 4), ('tcp', 'tcp://10.0.0.5:8786'))
    """
    value = raw.strip()
    remedy = "DASK_SCHEDULER=tcp://host:port (a running `dask scheduler`) or local:N (N worker processes here)"
    if value.startswith("local:"):
        n = value[len("local:") :]
        if not n.isdigit() or not 1 <= int(n) <= 256:
            raise UsageError(f"DASK_SCHEDULER={raw!r}: local:N needs N in 1..256", remedy=remedy)
        return "local", int(n)
    host, sep, port = value[len("tcp://") :].rpartition(":")
    if (
        value.startswith("tcp://")
        and sep
        and host.strip("[]")
        and port.isdigit()
        and 1 <= int(port) <= 65535
        and not any(c in host for c in "/?#@ ")
    ):
        return "tcp", value
    raise UsageError(f"DASK_SCHEDULER={raw!r} is not tcp://host:port or local:N", remedy=remedy)


def _path(name: str, raw: str | None, *, must_exist: bool) -> Path | None:
    if raw is None:
        return None
    p = Path(raw).expanduser()
    if must_exist and not p.is_file():
        raise UsageError(f"{name}={raw}: no such file", remedy=f"check the {name} path")
    return p.resolve() if must_exist else p


#: Secrets are read from the environment only, never from the command line.
ENV_ONLY = {
    "API_KEY": "CACHEBUILD_API_KEY",
    "HTTP_HEADERS": "CACHEBUILD_HTTP_HEADERS",
    "KEY_PASSPHRASE": "CACHEBUILD_KEY_PASSPHRASE",
    "SSH_KEY_PASSPHRASE": "CACHEBUILD_SSH_KEY_PASSPHRASE",
    "COMPANION_KEY_PASSPHRASE": "CACHEBUILD_COMPANION_KEY_PASSPHRASE",
}


def _http(get: Any) -> dict[str, str]:
    """HTTP settings, validated now (before the lock), passed to the provider."""
    out = {}
    limits = {
        "HTTP_TIMEOUT": (0.001, 3600.0),
        "HTTP_DEADLINE": (0.001, 86400.0),
        "HTTP_RETRIES": (0, 20),
        "HTTP_BACKOFF": (0.0, 60.0),
        "RATE_LIMIT": (0.0, 100_000.0),
    }
    for name, (lo, hi) in limits.items():
        raw = get(name)
        if raw is None:
            continue
        if name == "HTTP_RETRIES":
            _int(name, raw, 0, int(lo), int(hi))
        else:
            _float(name, raw, 0.0, lo, hi)
        out[name] = raw
    for name in ("FETCH_DEADLINE", "TILE_MAX_AGE"):
        if (raw := get(name)) is not None:
            parse_duration(name, raw)
            out[name] = raw
    subdomains = get("SUBDOMAINS")
    if subdomains is not None:
        parse_subdomains(subdomains)
        out["SUBDOMAINS"] = subdomains
    return out


def _provider(raw: str | None) -> str:
    """PROVIDER; a URL with user:password in it is refused here, for every command."""
    if raw is not None and "://" in raw:
        refuse_userinfo(raw)
    return raw or DEFAULT_PROVIDER


def _nodata(get: Any) -> dict[str, str]:
    """NODATA settings, validated and normalised; empty when off."""

    raw = {}
    for name in ("NODATA", "NODATA_SHA256"):
        value = get(name)
        if value is not None:
            raw[name] = value
    rule = NoDataRule.from_env(raw)
    out = {}
    if rule.uniform:
        out["NODATA"] = "uniform"
    if rule.sha256:
        out["NODATA_SHA256"] = ",".join(sorted(rule.sha256))
    return out


def _check_env_secrets(env: Mapping[str, str]) -> None:
    """Refuse malformed extra headers before the lock; never echo their values."""
    if env.get(ENV_ONLY["HTTP_HEADERS"], "").strip():
        parse_headers(env[ENV_ONLY["HTTP_HEADERS"]])


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(name: str, raw: str) -> int:
    """Bytes from ``raw``: a number, optionally with K, M, G or T (powers of 1024).

    >>> parse_size("MAX_STORE_BYTES", "1.5G"), parse_size("MAX_STORE_BYTES", "4096")
    (1610612736, 4096)
    """
    text = raw.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS and text[-1:] else ""
    try:
        value = float(text[: len(text) - len(unit)])
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a size (e.g. 500M, 20G)") from None
    if not (value >= 0 and value * _SIZE_UNITS[unit] < 2**62):
        raise UsageError(f"{name}={raw!r} is outside 0..{2**62}")
    return int(value * _SIZE_UNITS[unit])


def _quality(get: Any) -> dict[str, Any]:
    """INDEX, WINDOW_STRIDE, SELFTEST_QUERIES, MIN_RECALL and MAX_STORE_BYTES, validated."""
    kind = (get("INDEX") or "auto").lower()
    if kind not in ("auto", "flat", "hnsw", "ivf"):
        raise UsageError(f"INDEX={kind!r} must be auto, flat, hnsw or ivf")
    stride = _int("WINDOW_STRIDE", get("WINDOW_STRIDE"), 4, 1, 8)
    if stride not in (1, 2, 4, 8):
        raise UsageError(f"WINDOW_STRIDE={stride} must be 1, 2, 4 or 8 (windows per tile side)")
    raw_recall = get("MIN_RECALL")
    raw_bytes = get("MAX_STORE_BYTES")
    return {
        "index_kind": kind,
        "window_stride": stride,
        "selftest_queries": _int("SELFTEST_QUERIES", get("SELFTEST_QUERIES"), 200, 0, 100_000),
        "min_recall": None
        if raw_recall is None
        else _float("MIN_RECALL", raw_recall, 0.0, 0.0, 1.0),
        "recall_warn": _float("RECALL_WARN", get("RECALL_WARN"), 0.9, 0.0, 1.0),
        "max_store_bytes": None if raw_bytes is None else parse_size("MAX_STORE_BYTES", raw_bytes),
    }


def _refuse_names(vars: Mapping[str, str]) -> None:
    """A secret on the command line, or a variable no command reads: refused."""
    secret = sorted(
        k for k in vars if k in ENV_ONLY or k in ENV_ONLY.values()
    )  # named, never the value
    if secret:
        raise UsageError(
            f"{secret[0]} is a secret: it is read from the environment only, never the command line",
            remedy=f"export {ENV_ONLY.get(secret[0], secret[0])}=... "
            "(the command line shows in ps and shell history)",
        )
    unknown = sorted(k for k in vars if k not in VARIABLES)
    if unknown:
        raise UsageError(
            f"unknown variable(s): {', '.join(unknown)}{did_you_mean(unknown[0], VARIABLES)}",
            remedy="known: " + ", ".join(VARIABLES),
        )


def load_settings(
    vars: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read and validate every variable; raise :class:`UsageError` on a bad one.

    >>> s = load_settings({"ZOOM": "16,17"}, {"CACHEBUILD_HOME": "/tmp/cb"})
    >>> s.zooms, str(s.cache_dir)
    ((16, 17), '/tmp/cb/cache')
    """
    vars = dict(vars or {})
    env = dict(os.environ if env is None else env)
    home = cachebuild_home(env)
    _refuse_names(vars)
    get = lambda name: _get(name, vars, env)  # noqa: E731
    cache_dir = Path(get("CACHE_DIR") or home / "cache").expanduser().absolute()
    raw_store, shared_store = get("STORE"), None
    if raw_store is not None and "://" in raw_store:
        shared_store, raw_store = str(parse_store_url(raw_store)), None
    store = Path(raw_store or home / "store").expanduser().absolute()
    precision = (get("PRECISION") or DEFAULT_PRECISION).lower()
    if precision not in ("fp32", "fp16", "int8"):
        raise UsageError(f"PRECISION={precision!r} must be fp32, fp16 or int8")
    backend = (get("BACKEND") or DEFAULT_BACKEND).lower()
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        raise UsageError(f"BACKEND={backend!r} must be auto, tensorrt or onnxruntime")
    raw_workspace = get("WORKSPACE")
    workspace = 1 << 30 if raw_workspace is None else parse_size("WORKSPACE", raw_workspace)
    if workspace < 1 << 20:
        raise UsageError(f"WORKSPACE={raw_workspace!r} is below 1M", remedy="set WORKSPACE=1G")
    report = (get("REPORT") or "text").lower()
    if report not in ("text", "json"):
        raise UsageError(f"REPORT={report!r} must be text or json")
    threads_raw = get("THREADS")
    dask = get("DASK_SCHEDULER")
    if dask is not None:
        parse_dask_scheduler(dask)
        dask = dask.strip()
    _check_env_secrets(env)
    return Settings(
        flight=get("FLIGHT"),
        cache_dir=cache_dir,
        store=store,
        home=home,
        zooms=_zooms(get("ZOOM")),
        buffer_m=_float("BUFFER_M", get("BUFFER_M"), DEFAULT_BUFFER_M, 0.0, 1_000_000.0),
        max_tiles=_int("MAX_TILES", get("MAX_TILES"), DEFAULT_MAX_TILES, 1, 10**12),
        provider=_provider(get("PROVIDER")),
        concurrency=_int("CONCURRENCY", get("CONCURRENCY"), DEFAULT_CONCURRENCY, 1, 256),
        http=_http(get),
        nodata=_nodata(get),
        retry_missing=_bool("RETRY_MISSING", get("RETRY_MISSING"), False),
        model=_path("MODEL", get("MODEL"), must_exist=True),
        calibration=_path("CALIBRATION", get("CALIBRATION"), must_exist=True),
        precision=precision,
        backend=backend,
        workspace=workspace,
        batch=_int("BATCH", get("BATCH"), DEFAULT_BATCH, 1, 4096),
        threads=None if threads_raw is None else _int("THREADS", threads_raw, 0, 1, 1024),
        dask_scheduler=dask,
        pipeline=_bool("PIPELINE", get("PIPELINE"), True),
        key=_path("KEY", get("KEY"), must_exist=True),
        pubkey=_path("PUBKEY", get("PUBKEY"), must_exist=True),
        allow_dev_key=_bool("ALLOW_DEV_KEY", get("ALLOW_DEV_KEY"), False),
        expires_days=_float(
            "EXPIRES_DAYS", get("EXPIRES_DAYS"), DEFAULT_EXPIRES_DAYS, 0.001, 3650.0
        ),
        strict=_bool("STRICT", get("STRICT"), True),
        **_quality(get),
        report=report,
        flights_api_url=get("FLIGHTS_API_URL"),
        flights_api_timeout=_float(
            "FLIGHTS_API_TIMEOUT", get("FLIGHTS_API_TIMEOUT"), 10.0, 0.001, 600.0
        ),
        offline=_bool("OFFLINE", get("OFFLINE"), False),
        **_companion(get),
        shared_store=shared_store,
        given={name: value for name in VARIABLES if (value := get(name)) is not None},
        env=env,
    )
