"""SingleFlight: concurrent callers of one key share one call."""

from __future__ import annotations

import asyncio

import pytest

from pullthrough.proxy.inflight import SingleFlight


class Call:
    """A call the test finishes when it wants, counting how often it ran."""

    def __init__(self) -> None:
        self.runs = 0
        self.done = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self) -> str:
        self.runs += 1
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return f"result {self.runs}"


async def test_concurrent_callers_share_one_call() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    call = Call()
    callers = [asyncio.create_task(flights.run("k", call)) for _ in range(5)]
    await asyncio.sleep(0)
    call.done.set()
    results = [await c for c in callers]
    assert call.runs == 1
    assert [r for r, _ in results] == ["result 1"] * 5
    assert [shared for _, shared in results] == [False, True, True, True, True]


async def test_other_keys_run_their_own_call() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    a, b = Call(), Call()
    first = asyncio.create_task(flights.run("a", a))
    second = asyncio.create_task(flights.run("b", b))
    await asyncio.sleep(0)
    a.done.set()
    b.done.set()
    assert await first == ("result 1", False)
    assert await second == ("result 1", False)
    assert (a.runs, b.runs) == (1, 1)


async def test_a_finished_call_is_not_reused() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    call = Call()
    call.done.set()
    assert await flights.run("k", call) == ("result 1", False)
    assert await flights.run("k", call) == ("result 2", False)


async def test_every_caller_gets_the_error_and_the_next_call_starts_afresh() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    call = Call()
    call.error = RuntimeError("upstream down")
    callers = [asyncio.create_task(flights.run("k", call)) for _ in range(3)]
    await asyncio.sleep(0)
    call.done.set()
    for caller in callers:
        with pytest.raises(RuntimeError, match="upstream down"):
            await caller
    call.error = None
    assert await flights.run("k", call) == ("result 2", False)


async def test_a_caller_going_away_does_not_cancel_the_call_for_the_others() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    call = Call()
    leaving = asyncio.create_task(flights.run("k", call))
    staying = asyncio.create_task(flights.run("k", call))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    call.done.set()
    assert await staying == ("result 1", True)
    assert call.runs == 1
