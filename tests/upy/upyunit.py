# Minimal test runner for MicroPython-side tests (runs under the unix port).
#   micropython upyunit.py MODULE            lists the test functions, one per line
#   micropython upyunit.py MODULE NAME       runs one; exit status 0 = pass, 1 = fail
# A test is a top-level function named test_*; an `async def` one is run with asyncio.run().
# Failures print the MicroPython traceback, which pytest shows as the failure.
import sys


def _tests(mod):
    return sorted(n for n in dir(mod) if n.startswith("test_") and callable(getattr(mod, n)))


def main():
    mod = __import__(sys.argv[1])
    if len(sys.argv) == 2:
        for name in _tests(mod):
            print(name)
        return 0
    result = getattr(mod, sys.argv[2])()
    if hasattr(result, "send"):
        import asyncio

        asyncio.run(result)
    print("upyunit: PASS")
    return 0


try:
    sys.exit(main())
except Exception as e:
    sys.print_exception(e)
    sys.exit(1)
