"""serene deploy: compile the firmware with mpy-cross and copy it to a board with mpremote.

The plan, in order (`--dry-run` prints it and does nothing):
  1. compile every .py of firmware/ and drivers/ with mpy-cross for the board's architecture
     (`--march`, armv7emsp for STM32F4/L4; none = portable bytecode, e.g. for the unix port);
  2. create the package directories on the board and copy the .mpy files, boot.py and main.py;
  3. copy the module's config (`--config`, a JSON file made by provisioning) as :config.json;
  4. put the MicroPython-side libraries on: `--libs local` copies the ones fetched into .lib
     (umqtt.simple...) to :lib/, `--libs mip` runs `mip.install(name)` ON the board (it needs
     network); `--libs none` skips them.
Every step is one mpremote invocation on `--device`; `--resume` keeps mpremote from
soft-resetting first (needed for the unix port's REPL, which never prints "soft reboot").
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile

from . import REPO, upy, upylibs
from .cli import CliError


def add_arguments(p):
    p.add_argument("--device", default="auto", help="serial port of the board (mpremote connect)")
    p.add_argument("--march", default="armv7emsp", help="mpy-cross -march; 'none' for bytecode")
    p.add_argument("--config", help="module config JSON to install as :config.json")
    p.add_argument("--libs", choices=("local", "mip", "none"), default="local")
    p.add_argument("--resume", action="store_true", help="do not soft-reset the board first")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")


def mpremote_exe():
    exe = pathlib.Path(sys.executable).parent / "mpremote"
    return str(exe) if exe.exists() else "mpremote"


_MKDIRS = "import os\nfor p in %r:\n    try:\n        os.mkdir(p)\n    except OSError:\n        pass"


def _copy_steps(head, files, root, dest_dir=()):
    """One `fs cp f1 f2 .. :dir/` per destination directory."""
    by_dir = {}
    for f in files:
        rel = f.relative_to(root)
        by_dir.setdefault("/".join(dest_dir + rel.parent.parts), []).append(str(f))
    return [head + ["fs", "cp"] + srcs + [":" + (d + "/" if d else "./")] for d, srcs in
            sorted(by_dir.items())]


def plan(build_dir, device, config=None, libs="local", resume=False):
    """The mpremote invocations, as argument lists, that put build_dir on the board."""
    build_dir = pathlib.Path(build_dir)
    head = [mpremote_exe(), "connect", device] + (["resume"] if resume else [])
    mpys = sorted(build_dir.rglob("*.mpy"))
    # `fs mkdir` fails on an existing directory; a guarded os.mkdir makes re-deploys work.
    dirs = sorted({"/".join(p.parent.relative_to(build_dir).parts) for p in mpys})
    steps = [head + ["exec", _MKDIRS % (tuple(dirs),)]]
    steps += _copy_steps(head, mpys, build_dir)
    entries = [build_dir / e for e in upy.ENTRY_POINTS if (build_dir / e).exists()]
    steps += _copy_steps(head, entries, build_dir)
    if config:
        steps.append(head + ["fs", "cp", str(config), ":config.json"])
    if libs == "local":
        lib_files = sorted(upy.LIB_DIR.rglob("*.py"))
        lib_dirs = ["lib"] + sorted(
            {"/".join(("lib",) + p.parent.relative_to(upy.LIB_DIR).parts) for p in lib_files}
            - {"lib"}
        )
        steps.append(head + ["exec", _MKDIRS % (tuple(lib_dirs),)])
        steps += _copy_steps(head, lib_files, upy.LIB_DIR, ("lib",))
    elif libs == "mip":
        names = tuple(upylibs.MIP_NAMES.values())
        steps.append(head + ["exec", "import mip\nfor n in %r:\n    mip.install(n)" % (names,)])
    return steps


def build(out_dir, march):
    try:
        return upy.compile_tree(out_dir, march=None if march == "none" else march)
    except upy.UpyError as e:
        raise CliError(str(e)) from None


def run(args):
    if args.config and not pathlib.Path(args.config).is_file():
        raise CliError("no config file %s" % args.config)
    out = pathlib.Path(tempfile.mkdtemp(prefix="serene-deploy-"))
    try:
        build(out, args.march)
        steps = plan(out, args.device, args.config, args.libs, args.resume)
        for step in steps:
            print(" ".join(_quote(a) for a in step), flush=True)
            if args.dry_run:
                continue
            res = subprocess.run(step, capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise CliError("mpremote failed (%d): %s" % (res.returncode, res.stderr.strip()))
        print("deploy: %d steps %s" % (len(steps), "planned" if args.dry_run else "done"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 0


def _quote(a):
    return repr(a) if (" " in a or "\n" in a) else a
