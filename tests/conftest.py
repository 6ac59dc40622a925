"""pytest drives the real MicroPython unix port.

- tests/upy/test_*.py are MicroPython modules: every top-level test_* function in them is
  collected as its own pytest item and run in its own micropython process (upyunit.py); a
  failure shows the MicroPython traceback. They are never imported by CPython.
- Host-side tests use the `upy` fixture to run firmware scripts (from source or from .mpy
  files compiled by mpy-cross) with a chosen heap, and to start long-running processes.
"""

import pathlib
import subprocess

import pytest

from serene import upy as upy_mod

UPY_TESTS = pathlib.Path(__file__).parent / "upy"
UPY_TIMEOUT_S = 120


class UpyFailure(Exception):
    pass


class UpyItem(pytest.Item):
    def __init__(self, *, module, **kw):
        super().__init__(**kw)
        self.module = module

    def runtest(self):
        res = upy_mod.run(
            ["upyunit.py", self.module, self.name],
            extra_paths=[UPY_TESTS],
            cwd=UPY_TESTS,
            timeout=UPY_TIMEOUT_S,
        )
        if res.returncode != 0 or "upyunit: PASS" not in res.stdout:
            raise UpyFailure(res.stdout + res.stderr)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, UpyFailure):
            return "MicroPython test failed:\n" + str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, "upy:%s::%s" % (self.module, self.name)


class UpyFile(pytest.File):
    def collect(self):
        module = self.path.stem
        res = upy_mod.run(
            ["upyunit.py", module], extra_paths=[UPY_TESTS], cwd=UPY_TESTS, timeout=60
        )
        if res.returncode != 0:
            raise UpyFailure("cannot list tests of %s:\n%s%s" % (module, res.stdout, res.stderr))
        for name in res.stdout.split():
            yield UpyItem.from_parent(self, name=name, module=module)


def pytest_pycollect_makemodule(module_path, parent):
    # MicroPython test modules: collected by listing them under micropython, never imported.
    if module_path.parent == UPY_TESTS and module_path.name.startswith("test_"):
        return UpyFile.from_parent(parent, path=module_path)
    return None


class Upy:
    """Runs firmware code on the unix port. `mpy_dir` is the tree compiled by mpy-cross."""

    def __init__(self, mpy_dir):
        self.mpy_dir = mpy_dir

    def run(self, args, heap=None, mpy=False, timeout=120, check=True, **kw):
        res = upy_mod.run(
            args, heap=heap, code_dir=self.mpy_dir if mpy else None, timeout=timeout, **kw
        )
        if check and res.returncode != 0:
            raise AssertionError(
                "micropython %s exited %d\n%s%s" % (args, res.returncode, res.stdout, res.stderr)
            )
        return res

    def popen(self, args, heap=None, mpy=False, **kw):
        return upy_mod.popen(args, heap=heap, code_dir=self.mpy_dir if mpy else None, **kw)


@pytest.fixture(scope="session")
def mpy_dir(tmp_path_factory):
    """firmware/ and drivers/ compiled by mpy-cross (bytecode that runs on the unix port)."""
    return upy_mod.compile_tree(tmp_path_factory.mktemp("mpy"))


@pytest.fixture(scope="session")
def upy(mpy_dir):
    return Upy(mpy_dir)


@pytest.fixture
def procs():
    """Processes started by a test; all are stopped at its end, whatever happened."""
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
