"""Every simulator runs beside synchronous code the same way (:class:`runtime.simulator.httpd.ThreadServed`):
``async with`` inside a loop, or a daemon :class:`LoopThread` of its own, stopped once from any thread."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable

import httpx
import pytest

from runtime.simulator.httpd import ThreadServed
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events
from runtime.simulator.plc import PlcDirectory, PlcSimulator
from runtime.simulator.relay import RelaySimulator


class Recorder(ThreadServed):
    """Records where and how often it was started and stopped."""

    thread_name = "recorder-sim"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.started: list[str] = []
        self.stopped: list[str] = []

    async def start(self) -> None:
        if self.fail:
            raise OSError("address in use")
        self.started.append(threading.current_thread().name)

    async def stop(self) -> None:
        self.stopped.append(threading.current_thread().name)


def test_start_and_stop_run_on_the_simulators_own_thread() -> None:
    rec = Recorder().start_in_thread()
    assert rec.started == ["recorder-sim"]
    assert rec.call(lambda: threading.current_thread().name) == "recorder-sim"

    async def coroutine() -> int:
        return 42

    assert rec.call(coroutine) == 42, "a returned coroutine is awaited on the loop"
    rec.stop_thread()
    assert rec.stopped == ["recorder-sim"]
    assert not [t for t in threading.enumerate() if t.name == "recorder-sim"]


def test_stop_thread_stops_once_whichever_threads_call_it() -> None:
    rec = Recorder().start_in_thread()
    callers = [threading.Thread(target=rec.stop_thread) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(30)
    rec.stop_thread()
    assert rec.stopped == ["recorder-sim"]


def test_a_failed_start_raises_and_leaves_no_thread() -> None:
    with pytest.raises(OSError, match="address in use"):
        Recorder(fail=True).start_in_thread()
    assert not [t for t in threading.enumerate() if t.name == "recorder-sim"]


def test_stop_thread_and_call_without_a_thread() -> None:
    rec = Recorder()
    rec.stop_thread()  # never started: nothing to do
    assert rec.stopped == []
    with pytest.raises(RuntimeError, match="not served from a thread"):
        rec.call(lambda: None)


def test_async_with_starts_and_stops_in_the_callers_loop() -> None:
    async def run() -> Recorder:
        async with Recorder() as rec:
            assert rec.started and not rec.stopped
        return rec

    rec = asyncio.run(run())
    assert len(rec.started) == len(rec.stopped) == 1


@pytest.mark.parametrize("make", [
    lambda: JetstreamSimulator(synthetic_events(5, seed=1)),
    lambda: RelaySimulator([]),
    lambda: PlcSimulator(PlcDirectory()),
], ids=["jetstream", "relay", "plc"])
def test_each_simulator_serves_from_its_thread(
        make: Callable[[], JetstreamSimulator | RelaySimulator | PlcSimulator]) -> None:
    sim = make()
    assert isinstance(sim, ThreadServed)
    sim.start_in_thread()
    try:
        url = sim.url.replace("ws://", "http://")
        assert not url.endswith(":0")
        # a websocket endpoint answers a plain GET on another path with 404; the PLC directory with 404 too
        assert httpx.get(url + "/nothing-here", timeout=10).status_code == 404
    finally:
        sim.stop_thread()
        sim.stop_thread()  # again: nothing more


def test_serve_until_signal_prints_the_banner_and_stops_on_sigterm(capsys: pytest.CaptureFixture[str]) -> None:
    rec = Recorder()

    async def run() -> None:
        asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(rec.serve_until_signal(lambda: f"serving {len(rec.started)}"), 10)

    asyncio.run(run())
    assert capsys.readouterr().out == "serving 1\n", "the banner is made once it listens"
    assert len(rec.started) == len(rec.stopped) == 1
