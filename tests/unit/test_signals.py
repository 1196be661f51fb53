"""SIGINT/SIGTERM as a graceful stop (:mod:`runtime.process.signals`): installed for a block, the previous
handlers back after it, and nothing installed outside the main thread."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any

import pytest

from runtime.process.signals import STOP_SIGNALS, handle_stop_signals, set_on_stop_signals, stop_signal_event


def _handlers() -> dict[int, Any]:
    return {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}


def _in_thread(fn: Any) -> Any:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(30)
    return out[0]


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_loop_signal_calls_the_callback_with_its_arguments(sig: signal.Signals) -> None:
    before = _handlers()
    calls: list[str] = []

    async def run() -> tuple[signal.Signals, ...]:
        with handle_stop_signals(calls.append, "signal") as installed:
            os.kill(os.getpid(), sig)
            for _ in range(100):
                if calls:
                    break
                await asyncio.sleep(0.01)
        return installed

    assert asyncio.run(run()) == STOP_SIGNALS
    assert calls == ["signal"], "one signal, one call: the callback decides what a stop means"
    assert _handlers() == before


def test_the_loop_handlers_are_removed_when_the_block_fails() -> None:
    before = _handlers()

    async def run() -> None:
        with handle_stop_signals(lambda: None):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(run())
    assert _handlers() == before


def test_a_loop_outside_the_main_thread_installs_nothing() -> None:
    async def run() -> tuple[signal.Signals, ...]:
        with handle_stop_signals(lambda: None) as installed:
            return installed

    assert _in_thread(lambda: asyncio.run(run())) == ()


def test_the_stop_event_is_set_by_a_signal() -> None:
    async def run() -> bool:
        with stop_signal_event() as stop:
            assert not stop.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(stop.wait(), 5)
            return stop.is_set()

    assert asyncio.run(run()) is True


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_signal_sets_the_threading_event_and_the_old_handlers_come_back(sig: signal.Signals) -> None:
    before = _handlers()
    stop = threading.Event()
    with set_on_stop_signals(stop) as installed:
        assert installed is True
        os.kill(os.getpid(), sig)
        assert stop.wait(5)
    assert _handlers() == before


def test_the_threading_variant_outside_the_main_thread_installs_nothing() -> None:
    before = _handlers()

    def run() -> bool:
        with set_on_stop_signals(threading.Event()) as installed:
            return installed

    assert _in_thread(run) is False
    assert _handlers() == before
