"""Units of the hostile-server defences (cachebuild._util.httpsafe) and the retry
policy (cachebuild._util.retry), against real loopback servers; the builds
that show them to an operator are in tests/scenarios/test_http_hostile.py."""

from __future__ import annotations

import doctest
import socket
import threading
import types
import zlib
from collections.abc import Iterator

import httpx
import pytest

from cachebuild._util import httpsafe
from cachebuild._util import retry as retrypolicy
from cachebuild.providers import xyzconfig
from tests._harness import tileserver
from tests._harness.surface import assert_public_surface


@pytest.mark.parametrize("mod", [httpsafe, retrypolicy, xyzconfig], ids=lambda m: m.__name__)
def test_all_and_doctests(mod: types.ModuleType) -> None:
    assert_public_surface(mod)
    assert doctest.testmod(mod).failed == 0


@pytest.fixture
def server() -> Iterator[tileserver.TileServer]:
    srv = tileserver.TileServer()
    yield srv
    srv.close()


def _get(client: httpx.Client, url: str, limit: int) -> bytes:
    response = httpsafe.get(client, url, headers={}, public=(), timeout=5)
    try:
        return httpsafe.read_body(response, limit)
    finally:
        response.close()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "deflate-raw"])
def test_read_body_decodes_within_the_limit_and_refuses_past_it(
    server: tileserver.TileServer, encoding: str
) -> None:
    data = bytes(range(256)) * 1000
    wbits = {
        "gzip": 16 + zlib.MAX_WBITS,
        "deflate": zlib.MAX_WBITS,
        "deflate-raw": -zlib.MAX_WBITS,
    }[encoding]
    c = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = c.compress(data) + c.flush()
    server.fault_rate(
        tileserver.Reply(200, body, {"Content-Encoding": encoding.split("-")[0]}), 1.0, attempts=100
    )
    url = f"http://127.0.0.1:{server.port}/17/1/1.jpg"
    with httpx.Client() as client:
        assert _get(client, url, len(data)) == data
        with pytest.raises(httpsafe.BodyTooLarge):
            _get(client, url, len(data) - 1)


def test_an_encoding_not_asked_for_is_refused(server: tileserver.TileServer) -> None:
    server.fault_rate(
        tileserver.Reply(200, b"\x1b\x00", {"Content-Encoding": "br"}), 1.0, attempts=100
    )
    with httpx.Client() as client, pytest.raises(httpsafe.BadEncoding, match="br"):
        _get(client, f"http://127.0.0.1:{server.port}/17/1/1.jpg", 1 << 20)


def test_a_declared_length_over_the_limit_is_refused_before_reading(
    server: tileserver.TileServer,
) -> None:
    with httpx.Client() as client, pytest.raises(httpsafe.BodyTooLarge, match="body of"):
        _get(client, f"http://127.0.0.1:{server.port}/17/1/1.jpg", 10)


def test_stop_wakes_a_blocked_read() -> None:
    """A server that never answers: stop() from another thread ends the request."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    guard = httpsafe.HttpGuard()
    errors: list[BaseException] = []
    with httpx.Client(timeout=60) as client:
        guard.install(client)

        def ask() -> None:
            try:
                client.get(f"http://127.0.0.1:{listener.getsockname()[1]}/")
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                errors.append(exc)

        worker = threading.Thread(target=ask)
        worker.start()
        conn, _ = listener.accept()
        conn.recv(1024)  # the request is on the wire; no answer comes
        guard.stop()
        worker.join(timeout=10)
        alive = worker.is_alive()
    conn.close()
    listener.close()
    assert not alive and errors and isinstance(errors[0], httpsafe.Stopped)


def test_fail_fast_needs_the_same_dead_kind_from_the_start() -> None:
    ff = retrypolicy.FailFast(after=3)
    assert (
        ff.failed("h", "refused") is None and ff.failed("h", "dns") is None
    )  # not all the same way
    assert ff.failed("h", "dns") is None and ff.failed("h", "dns") is None
    ff = retrypolicy.FailFast(after=2)
    ff.answered()  # the server answered once: retries decide
    assert ff.failed("h", "refused") is None and ff.failed("h", "refused") is None
    ff = retrypolicy.FailFast(after=2)
    assert ff.failed("h", None) is None and ff.failed("h", "refused") is None  # a timeout first
    ff = retrypolicy.FailFast(after=2)
    assert ff.failed("h", "tls") is None and "TLS" in (ff.failed("h", "tls") or "")


def test_failure_kind_of_real_httpx_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with httpx.Client() as client:
        with pytest.raises(httpx.ConnectError) as refused:
            client.get(f"http://127.0.0.1:{port}/")
        with pytest.raises(httpx.ConnectError) as dns:
            client.get("http://nosuch.invalid/")
    assert retrypolicy.failure_kind(refused.value) == "refused"
    assert retrypolicy.failure_kind(dns.value) == "dns"


def test_thread_pools_keep_one_pool_per_thread_and_close_the_ended(
    server: tileserver.TileServer,
) -> None:
    """Each thread reuses its own connection; an ended thread's pool closes when the next is made."""
    made: list[httpx.HTTPTransport] = []

    def make() -> httpx.HTTPTransport:
        made.append(httpx.HTTPTransport())
        return made[-1]

    def connections(t: httpx.HTTPTransport) -> int:
        return len(t._pool.connections)  # noqa: SLF001 - what the test looks at

    url = f"http://127.0.0.1:{server.port}/17/1/1.jpg"
    client = httpx.Client()
    httpsafe.pool_per_thread(client, make)

    def ask(n: int, together: threading.Barrier | None = None) -> None:
        for i in range(n):
            assert len(_get(client, url, 1 << 20)) > 0
            if i == 0 and together is not None:
                together.wait(timeout=10)  # every pool made while the other threads live

    three = threading.Barrier(3)
    first = [threading.Thread(target=ask, args=(5, three)) for _ in range(3)]
    for t in first:
        t.start()
    for t in first:
        t.join()
    assert len(made) == 3 and [connections(t) for t in made] == [1, 1, 1]
    ask(2)  # this thread's own pool: the three ended threads' pools are closed
    assert len(made) == 4 and [connections(t) for t in made] == [0, 0, 0, 1]
    client.close()
    assert connections(made[3]) == 0
    assert server.count() == 17
