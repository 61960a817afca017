"""A PROVIDER the arguments already show is wrong is refused before the lock,
and leaves doit's state alone: the next correct build is a no-op
(issue 18 item 9), through real ``doit build-cache`` runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._harness import tileserver
from tests.conftest import Cb, write_flight

KEY = tileserver.KEY


@pytest.fixture
def server() -> tileserver.TileServer:
    srv = tileserver.TileServer(key=KEY)
    yield srv  # type: ignore[misc]
    srv.close()


@pytest.mark.parametrize(
    "bad_template, env_key, needle",
    [
        ("/{z}/{x}/{y}.jpg?key={key}&v={version}", True, "{version}"),
        ("/{z}/{x}/{y}.jpg?key={key}", False, "CACHEBUILD_API_KEY"),
    ],
    ids=["unknown-placeholder", "key-without-api-key"],
)
def test_bad_provider_is_refused_before_the_lock_and_keeps_the_no_op(
    cb: Cb,
    tmp_path: Path,
    server: tileserver.TileServer,
    bad_template: str,
    env_key: bool,
    needle: str,
) -> None:
    flight = write_flight(tmp_path / "f.json")
    good = server.template()
    args = (f"FLIGHT={flight}", "BUFFER_M=100")
    with_key = cb.env(CACHEBUILD_API_KEY=KEY)
    first = cb.build(*args, f"PROVIDER={good}", env=with_key)
    assert first.code == 0, first.stderr[-3000:]
    requests = server.count()

    path, _, query = bad_template.partition("?")
    bad = cb.build(
        *args,
        f"PROVIDER={server.template(path, '?' + query)}",
        env=with_key if env_key else cb.env(),
    )
    assert bad.code == 2, bad.stderr[-3000:]
    rep = bad.report
    assert rep["failure_phase"] == "arguments" and needle in rep["error"], rep
    assert rep["tasks"] == {"run": [], "up_to_date": []}
    assert server.count() == requests
    assert KEY not in bad.stdout + bad.stderr

    again = cb.build(*args, f"PROVIDER={good}", env=with_key)
    assert again.code == 0, again.stderr[-3000:]
    rep = again.report
    assert rep["outcome"] == "up_to_date" and rep["tasks"]["run"] == [], rep["tasks"]
    assert rep["manifest_version"] == first.report["manifest_version"]
    assert server.count() == requests


def test_directory_template_with_a_url_placeholder_is_refused_before_the_lock(
    cb: Cb, tmp_path: Path
) -> None:
    flight = write_flight(tmp_path / "f.json")
    (tmp_path / "tiles").mkdir()
    r = cb.build(
        f"FLIGHT={flight}", "BUFFER_M=100", f"PROVIDER={tmp_path}/tiles/{{z}}/{{x}}/{{s}}.png"
    )
    assert r.code == 2, r.stderr[-3000:]
    rep = r.report
    assert rep["failure_phase"] == "arguments" and "{s}" in rep["error"]
    assert rep["tasks"] == {"run": [], "up_to_date": []}
