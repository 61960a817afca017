"""Tests for cachebuild._util.signals: interrupts held back across a step, then delivered."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest

from cachebuild._util import signals
from cachebuild._util.signals import deferred_interrupts
from cachebuild.cli.doitrun import sigterm_as_interrupt
from tests._harness.surface import own_public_names


def test_all_is_complete() -> None:
    assert set(signals.__all__) == own_public_names(signals)


def test_a_ctrl_c_inside_is_a_keyboard_interrupt_once_the_step_has_ended() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("the rest of the step")
        steps.append("after it")
    assert steps == ["the rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_is_taken_at_once() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("held")
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("not reached")
    assert steps == ["held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_builds_sigterm_is_held_too_and_its_handler_restored() -> None:
    with sigterm_as_interrupt():
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is handler


def test_nothing_held_nothing_raised_and_a_default_handler_is_left_alone() -> None:
    before = signal.getsignal(signal.SIGTERM)
    assert before == signal.SIG_DFL  # Python leaves SIGTERM at its default
    with deferred_interrupts():
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_it_does_nothing() -> None:
    seen: list[Any] = []

    def step() -> None:
        with deferred_interrupts():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=step)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]
