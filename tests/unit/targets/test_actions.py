"""The phase wrapper of every task's action."""

from __future__ import annotations

import pytest

from targets.actions import ACTIVE, phase_action


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
