"""serene deploy, end to end against the unix port's REPL on a pty (TOOLCHAIN.md recipe).

Two pty pairs joined by a relay: micropython's stdio on one slave (its REPL, with raw-REPL),
mpremote on the other. `mpremote connect <dev> resume ...` drives it like a board, whose
filesystem is the process's working directory.
"""

import os
import pty
import select
import subprocess
import sys
import threading
import time
import tty

import pytest

from serene import upy as upy_mod
from serene.deploy import mpremote_exe


class PtyRelay:
    def __init__(self):
        self.board_master, self.board_slave = pty.openpty()
        self.host_master, self.host_slave = pty.openpty()
        self.device = os.ttyname(self.host_slave)
        # Raw from the start: a cooked slave echoes what it receives back into the relay,
        # and the REPL banner would then bounce between the two sides forever.
        tty.setraw(self.host_slave)
        tty.setraw(self.board_slave)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        pairs = {self.board_master: self.host_master, self.host_master: self.board_master}
        while not self._stop:
            ready, _, _ = select.select(list(pairs), [], [], 0.1)
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                os.write(pairs[fd], data)

    def close(self):
        self._stop = True
        self._thread.join(2)
        for fd in (self.board_master, self.board_slave, self.host_master, self.host_slave):
            os.close(fd)


@pytest.fixture
def board(tmp_path):
    """A unix-port MicroPython REPL on a pty whose filesystem is tmp_path/fs."""
    fs = tmp_path / "fs"
    fs.mkdir()
    relay = PtyRelay()
    env = {k: v for k, v in os.environ.items() if k != "MICROPYPATH"}
    proc = subprocess.Popen(
        [upy_mod.micropython_exe()],
        stdin=relay.board_slave,
        stdout=relay.board_slave,
        stderr=relay.board_slave,
        cwd=fs,
        env=env,
    )
    time.sleep(0.5)  # the REPL banner; mpremote then enters raw REPL itself
    yield relay.device, fs
    proc.kill()
    proc.wait()
    relay.close()


def mpremote(device, *args):
    return subprocess.run(
        [mpremote_exe(), "connect", device, "resume", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_dry_run_prints_plan_and_changes_nothing(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "serene", "deploy", "--device", "/dev/nonexistent",
         "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "fs cp" in res.stdout and ":firmware/" in res.stdout
    assert "planned" in res.stdout


def test_deploy_lands_files_and_app_imports(board, tmp_path):
    device, fs = board
    cfg = tmp_path / "module.json"
    cfg.write_text('{"board": "unix", "poll_period_ms": 1000}')
    res = subprocess.run(
        [sys.executable, "-m", "serene", "deploy", "--device", device, "--resume",
         "--march", "none", "--config", str(cfg)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # What the board holds now: compiled packages, entry points, config, libraries.
    assert (fs / "firmware" / "record.mpy").is_file()
    assert (fs / "drivers" / "unix" / "serial_port.mpy").is_file()
    assert not (fs / "firmware" / "record.py").exists()
    assert (fs / "main.py").is_file() and (fs / "boot.py").is_file()
    assert (fs / "config.json").read_text() == cfg.read_text()
    assert (fs / "lib" / "umqtt" / "simple.py").is_file()
    # And the app imports on the "board", from the .mpy files, with its config.
    out = mpremote(
        device, "exec",
        "import sys\nsys.path.append('lib')\nimport firmware.app, firmware.config\n"
        "c = firmware.config.load('config.json')\nprint('imported', c['board'], c['poll_period_ms'])\n"
        "from umqtt.simple import MQTTClient\nprint('lib ok')",
    )
    assert out.returncode == 0, out.stderr
    assert "imported unix 1000" in out.stdout
    assert "lib ok" in out.stdout
