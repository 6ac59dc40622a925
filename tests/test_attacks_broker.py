"""Issue 8, attacks through the broker with one module's own account, against the real
Mosquitto and the real server: client-id takeover (item 1), and secrets on disk (item 9).

The hostile device is DEV2, with its genuine broker account; the victims are the running
server (IngestService, client id serene-server-0 on the server listener) and DEV's genuine
connection. On the main of before issue 8 both attacks closed the victim's connection
(Mosquitto closes an older connection with the same client id): the server missed what was
published while it reconnected, and DEV's connection dropped at every attempt.
"""

import json
import os
import stat
import subprocess
import sys

import pytest

from serene import broker as B
from test_server import DEV, DEV2, EPOCH, K_EPOCH, K_RECORD, FakeModule
from test_server_e2e import provision_fake

ATTEMPTS = 30


@pytest.fixture
def chain(tmp_path):
    from serene.server.ingest import Ingest
    from serene.server.service import IngestService
    from serene.server.store import Store, db_path
    from serene.verifier import from_home

    home = tmp_path / "home"
    provision_fake(home, [DEV, DEV2])
    with B.Broker(home, [DEV, DEV2]) as brk:
        srv = brk.server_credentials()
        svc = IngestService(lambda: Ingest(from_home(home), Store(db_path(home))),
                            brk.server_port, srv["username"], srv["password"]).start()
        try:
            yield home, brk, svc
        finally:
            svc.stop()


def last_cum(probe, m, want, timeout):
    """The highest cum of the acks `probe` receives until one reaches `want`."""
    import time

    best, deadline = -1, time.monotonic() + timeout
    while best < want and time.monotonic() < deadline:
        msg = probe.get(0.5)
        if msg is not None:
            best = max(best, m.open_ack(msg[1])[2])
    return best


def stored(home):
    from serene.server.store import Store, db_path

    st = Store(db_path(home), readonly=True)
    try:
        return st.seqs(DEV, EPOCH), st.device_ledger(DEV2)
    finally:
        st.close()


@pytest.mark.parametrize("victim", ["server", "device"])
def test_client_id_takeover_closes_no_one_else(chain, victim):
    home, brk, svc = chain
    m = FakeModule(home, DEV)
    creds, hostile = brk.credentials(DEV), brk.credentials(DEV2)
    with B.Probe(brk.port, creds["username"], creds["password"], client_id=DEV) as dev:
        assert dev.subscribe("serene/%s/down" % DEV) == 1
        dev.publish("serene/%s/up" % DEV, m.frame((K_EPOCH, 0, m.new_epoch())))
        assert dev.get(10) is not None
        stolen = svc.client_id if victim == "server" else DEV
        for seq in range(1, ATTEMPTS + 1):
            # The attack: DEV2's own account asks for the victim's client id...
            a = B.Probe(brk.port, hostile["username"], hostile["password"], client_id=stolen)
            # ...while the genuine module goes on publishing.
            dev.publish("serene/%s/up" % DEV, m.frame((K_RECORD, seq, m.record(seq))))
            a.close()
        # Acks are cumulative (two frames within one 10 ms tick share one): the victim keeps
        # receiving until the one that covers everything.
        cum = last_cum(dev, m, ATTEMPTS, 15)
        assert svc.wait_idle(10)
        assert dev.disconnects == 0, "the genuine module's connection was closed"
    assert svc.disconnects == 0, "the server's connection was closed"
    assert cum == ATTEMPTS
    seqs, _ = stored(home)
    assert sorted(seqs) == list(range(ATTEMPTS + 1))


def test_no_device_account_reaches_the_server_listener(chain):
    home, brk, svc = chain
    for dev in (DEV, DEV2):
        c = brk.credentials(dev)
        with pytest.raises(B.BrokerError, match="refused"):
            B.Probe(brk.server_port, c["username"], c["password"], client_id=svc.client_id)
    assert svc.disconnects == 0 and svc.connected.is_set()


# --- item 9: secrets on disk ---------------------------------------------------------------


def _secrets(home):
    """Strings that only a secret-holding file contains: every broker password, the modules'
    host keys, PEM private keys."""
    creds = json.loads((home / "broker" / "credentials.json").read_text())
    out = {creds["server"]["password"]}
    out |= {a["password"] for a in creds["devices"].values()}
    for mj in (home / "devices").glob("*/module.json"):
        cfg = json.loads(mj.read_text())
        out |= {cfg["host_mac_key"], cfg["host_cipher_key"]}
    return {s for s in out if s}


def _check_tree(root, secrets):
    holders, bad = [], []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                data = open(path, "rb").read()
            except OSError:
                continue
            text = data.decode("latin-1")
            if "PRIVATE KEY" in text or any(s in text for s in secrets) \
                    or name == "stsafe.json":  # the emulator's chip: private keys in hex
                holders.append(path)
                fmode = stat.S_IMODE(os.stat(path).st_mode)
                dmode = stat.S_IMODE(os.stat(dirpath).st_mode)
                if fmode != 0o600 or dmode != 0o700:
                    bad.append("%s %o in %o" % (os.path.relpath(path, root), fmode, dmode))
    return holders, bad


def test_every_file_holding_a_secret_is_0600_in_a_0700_directory(tmp_path):
    # A bench-like run: `serene bench` (provisioning, broker, server, the firmware, module.json
    # with its MQTT password), then `serene server --tls` on the same home.
    work = tmp_path / "bench"
    res = subprocess.run([sys.executable, "-m", "serene", "bench", "--duration", "3",
                          "--drain", "10", "--workdir", str(work), "--fresh", "--quiet",
                          "--heap", "512K"], capture_output=True, text=True, timeout=180)
    # (What is checked is what the run left on disk; the delivery is test_bench's business.)
    print(res.stdout[-3000:], res.stderr[-2000:])
    home = work / "home"
    res = subprocess.run([sys.executable, "-m", "serene", "server", "--home", str(home),
                          "--tls", "--duration", "1"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    secrets = _secrets(home)
    holders, bad = _check_tree(work, secrets)
    names = {os.path.relpath(p, work) for p in holders}
    assert "module.json" in names  # the bench's, with the module's MQTT password
    assert "home/broker/credentials.json" in names and "home/broker/tls/key.pem" in names
    assert any(n.endswith("devices.passwd") for n in names) is False  # hashes, not secrets
    assert not bad, bad
    conf = (home / "broker" / "mosquitto.conf").read_text()
    # --tls: one device listener, TLS; plus the server's loopback listener.
    assert conf.count("listener ") == 2 and "certfile" in conf
    info = json.loads((home / "broker" / "broker.json").read_text())
    assert info["port"] is None and info["tls_port"] and info["server_port"]
