"""The phase wrapper of every task's action."""

from __future__ import annotations

import pytest

from targets.actions import ACTIVE, phase_action, stop_describe_ahead


def test_a_ctrl_c_inside_an_extensions_import_is_an_interrupt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pybind11 turns a KeyboardInterrupt raised while a module initialises (onnxruntime's,
    in describe) into ``ImportError: initialization failed``; it stays an interrupt (exit
    130), not a describe failure (exit 21). Found by the sequence test's random SIGINT."""

    def describe() -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as k:
            raise ImportError("initialization failed") from k

    monkeypatch.setitem(ACTIVE, "locked", True)
    with pytest.raises(KeyboardInterrupt):
        phase_action("describe", describe)()


class _Describer:
    """A background describer whose first wait is cut by a Ctrl-C."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.stats = {"blocks": 0}

    def abort(self) -> None:
        self.calls.append("abort")

    def join(self) -> float:
        self.calls.append("join")
        if self.calls.count("join") == 1:
            raise KeyboardInterrupt
        return 0.0


def test_a_ctrl_c_while_describe_waits_stops_the_describer_before_it_propagates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a sweep of SIGINT delays: describe's wait for the background describer was
    cut, the describer kept running the engine, and the process aborted at exit (-6)."""
    ahead = _Describer()
    monkeypatch.setitem(ACTIVE, "ahead", ahead)
    with pytest.raises(KeyboardInterrupt):
        stop_describe_ahead(wait=True)
    assert ahead.calls == ["join", "abort", "join"]
    assert "ahead" not in ACTIVE
