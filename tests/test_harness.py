"""The test harness reports MicroPython failures with their traceback and measures heap."""

import textwrap

from serene import upy as upy_mod


def test_failing_upy_test_fails_with_traceback(tmp_path):
    (tmp_path / "test_bad.py").write_text(
        textwrap.dedent(
            """
            def test_boom():
                raise ValueError("expected failure 42")
            """
        )
    )
    runner = upy_mod.REPO / "tests" / "upy" / "upyunit.py"
    res = upy_mod.run([str(runner), "test_bad", "test_boom"], extra_paths=[tmp_path])
    assert res.returncode == 1
    assert "ValueError: expected failure 42" in res.stdout
    assert "upyunit: PASS" not in res.stdout


def test_heap_limit_is_enforced_and_peak_reported(upy, tmp_path):
    script = tmp_path / "alloc.py"
    script.write_text(
        "import micropython\n"
        "import sys\n"
        "n = int(sys.argv[1])\n"
        "b = bytearray(n)\n"
        "print(micropython.mem_peak())\n"
    )
    ok = upy.run([str(script), "20000"], heap="64K")
    assert int(ok.stdout.split()[-1]) >= 20000
    too_big = upy.run([str(script), "100000"], heap="64K", check=False)
    assert too_big.returncode != 0
    assert "MemoryError" in too_big.stdout + too_big.stderr
