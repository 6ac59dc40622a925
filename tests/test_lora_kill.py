"""FCntUp and DevNonce never repeat across SIGKILLs of a unix-port process at random instants
(joining, sending, persisting): drivers/lorawan with a DirStore on real files, the session
kept across restarts (test key wrapper), a rejoin every 40 uplinks.

SERENE_KILLS sets the number of kills (default 20; the issue's 100 is the slow profile:
SERENE_KILLS=100). Each run prints every DevNonce and (session, FCnt) it is about to put on
air, after it was reserved on flash; the test checks none was printed twice, and that the
restarts really resumed sessions (FCnt not back to 0) and really rejoined.
"""

import os
import random
import signal
import subprocess
import time

from serene import upy as upy_mod

KILLS = int(os.environ.get("SERENE_KILLS", "20"))


def test_fcnt_and_devnonce_never_repeat_across_sigkills(tmp_path):
    rng = random.Random(20261201)
    state = tmp_path / "lorawan"
    nonces, fcnts, resumed = [], [], 0
    for k in range(KILLS):
        p = upy_mod.popen(["tests/upy/lorawan_kill_node.py", str(state)],
                          extra_paths=[upy_mod.REPO / "tests" / "upy"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=10)
        assert p.returncode == -signal.SIGKILL, err.decode()[-2000:]
        lines = out.decode().splitlines()
        # The last line may have been cut by the kill mid-write: drop a partial one.
        if lines and not out.endswith(b"\n"):
            lines.pop()
        first_f = None
        for ln in lines:
            f = ln.split()
            if f[0] == "N":
                nonces.append(int(f[1]))
            elif f[0] == "F":
                sess, air, full = int(f[1]), int(f[2]), int(f[3])
                assert air == full & 0xFFFF
                fcnts.append((sess, full))
                if first_f is None:
                    first_f = full
        if first_f:
            resumed += 1
    assert len(nonces) == len(set(nonces)), "a DevNonce was used twice"
    assert len(fcnts) == len(set(fcnts)), "an FCntUp was used twice under one session"
    assert nonces == sorted(nonces), "DevNonce went backwards"
    assert len(nonces) >= 3 and len(fcnts) >= 100, (len(nonces), len(fcnts))
    assert resumed >= KILLS // 4, "sessions were not resumed after restarts: %d" % resumed
