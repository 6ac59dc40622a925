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


# --- the server's database: SQLite (the embedded default) and a private PostgreSQL -------------
#
# `database` (parametrized: sqlite, postgresql) runs a test once per backend. On postgresql
# it exports SERENE_DB (what store.db_url(home), the server, report and webapp read, also in
# subprocesses) naming a fresh database, created from a template migrated once per session,
# in a private cluster of Debian's `postgresql` package: its own data directory in a
# temporary directory, on a free loopback port, run as the unprivileged `postgres` user
# (runuser) when the tests run as root, stopped at the end of the session.

import glob  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402


def _pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]))
    return pathlib.Path(found[-1]).parent if found else None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A private PostgreSQL cluster (tests only: fsync off, trust authentication on
    loopback). url(name) -> postgresql://serene@127.0.0.1:PORT/name"""

    TEMPLATE = "serene_template"

    def __init__(self):
        self.bin = _pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (tools/dev setup installs "
                               "Debian's postgresql)")
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="serene-pg-"))
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = _free_port()
        self._names = itertools.count(1)
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "serene",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        opts = ("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
                % (self.port, self.dir))
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-o", opts, "-l",
                      str(self.dir / "log"), "-w", "start")
            self.admin(lambda c: c.execute("CREATE DATABASE %s" % self.TEMPLATE))
            from serene.server import schema

            eng = schema.make_engine(self.url(self.TEMPLATE))
            schema.migrate(eng)
            eng.dispose()
        except BaseException:
            self.stop()
            raise

    def _run(self, tool, *args):
        cmd = [str(self.bin / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=120)

    def url(self, name):
        return "postgresql://serene@127.0.0.1:%d/%s" % (self.port, name)

    def admin(self, fn):
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as c:
            return fn(c)

    def create(self):
        name = "t%d" % next(self._names)
        self.admin(lambda c: c.execute("CREATE DATABASE %s TEMPLATE %s STRATEGY FILE_COPY"
                                       % (name, self.TEMPLATE)))
        return name

    def drop(self, name):
        from serene.server.store import dispose_engines

        dispose_engines()
        self.admin(lambda c: c.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name))

    def backup(self, name, path):
        """pg_dump of a database (custom format), as an operator would take it."""
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(self.bin / "pg_dump"), "-Fc", "-f", str(path), self.url(name)],
                       check=True, timeout=120)

    def restore(self, path, name):
        """Replace database `name` by a pg_dump of it."""
        self.drop(name)
        self.admin(lambda c: c.execute("CREATE DATABASE %s" % name))
        subprocess.run([str(self.bin / "pg_restore"), "-d", self.url(name), str(path)],
                       check=True, timeout=120)

    def stop(self):
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    if _pg_bin() is None:
        pytest.fail("PostgreSQL is not installed: run tools/dev setup (it installs it)")
    c = PgCluster()
    yield c
    c.stop()


class Database:
    """The backend of a test: name "sqlite" (url None: the home's file) or "postgresql"."""

    def __init__(self, name, url=None, cluster=None, dbname=None):
        self.name, self.url, self.cluster, self.dbname = name, url, cluster, dbname

    @property
    def is_pg(self):
        return self.name == "postgresql"


def _database(request):
    # Its own MonkeyPatch: a test's monkeypatch.undo() must not unset SERENE_DB.
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "sqlite":
            mp.delenv("SERENE_DB", raising=False)
            yield Database("sqlite")
            return
        cluster = request.getfixturevalue("pg_cluster")
        name = cluster.create()
        url = cluster.url(name)
        mp.setenv("SERENE_DB", url)
        try:
            yield Database("postgresql", url, cluster, name)
        finally:
            cluster.drop(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request):
    """Each test once on SQLite and once on a fresh PostgreSQL database."""
    yield from _database(request)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_module(request):
    """The same for modules whose fixtures are module-scoped: one database per module and
    backend (its tests run on SQLite, then on PostgreSQL)."""
    yield from _database(request)
