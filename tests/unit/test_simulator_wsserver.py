"""The websocket simulators' shared pieces (:mod:`runtime.simulator.wsserver`): pacing and live ticks."""

from __future__ import annotations

import asyncio

import pytest

from runtime.simulator.wsserver import Pacer, live_ticks


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_pacer_without_a_rate_never_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    pacer = Pacer(0)

    async def run() -> None:
        for _ in range(5):
            await pacer.wait()

    asyncio.run(run())
    assert slept == []


def test_a_pacer_spaces_sends_by_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        clock.now += seconds

    monkeypatch.setattr(asyncio, "sleep", sleep)
    pacer = Pacer(4, clock=clock)

    async def run() -> None:
        await pacer.wait()  # the first send is due at once
        await pacer.wait()
        clock.now += 1.0  # a slow consumer: the next send is late already, no catching up in a burst
        await pacer.wait()
        await pacer.wait()

    asyncio.run(run())
    assert slept == [0.25, 0.25]


def test_live_ticks_carry_fractions_over(monkeypatch: pytest.MonkeyPatch) -> None:
    async def sleep(_seconds: float) -> None:
        return None

    monkeypatch.setattr(asyncio, "sleep", sleep)

    async def first(n: int, rate: float) -> list[int]:
        out: list[int] = []
        async for due in live_ticks(rate, tick=0.05):
            out.append(due)
            if len(out) == n:
                return out
        return out

    assert asyncio.run(first(3, 100)) == [5, 5, 5]
    # 30 per second: 1.5 per tick, so one tick makes 1 and the next 2
    assert asyncio.run(first(4, 30)) == [1, 2, 1, 2]
