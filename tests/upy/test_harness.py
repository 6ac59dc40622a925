# The MicroPython-side harness itself: sync and async tests run, and a failing one fails.
import sys


def test_runs_on_micropython():
    if sys.implementation.name != "micropython":
        raise AssertionError("not on MicroPython: " + sys.implementation.name)


async def test_async_test_is_awaited():
    import asyncio

    done = []

    async def worker():
        await asyncio.sleep_ms(1)
        done.append(1)

    await asyncio.gather(worker(), worker())
    if done != [1, 1]:
        raise AssertionError(done)
