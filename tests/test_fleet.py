"""serene fleet: N simulated modules with their own identities against `serene server`.

The end-to-end test runs `serene server` (its private Mosquitto, SQLite) and `serene fleet` as
separate processes on loopback, then checks the database itself: every object the fleet sent
is stored exactly once (the set of (device, epoch, seq) equals what the fleet says it sent,
nothing more), every module's acks were consistent (none claimed an unsent object, none went
back, none was forged), the ledger is complete and nothing was lost. The unit tests feed one
SimModule acks that must be refused, so the fleet's own checks are known to bite.
"""

import datetime
import json
import select
import sqlite3
import subprocess
import sys
import time

import cbor2
import pytest
from cryptography import x509

from serene.fleet import identity as I
from serene.fleet import sim
from serene.verifier import VerifyError, certs
from serene.verifier import protocol as vp

SERENE = [sys.executable, "-m", "serene"]
N = 200


@pytest.fixture(scope="module")
def fleet_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("fleet")
    I.provision_fleet(home, N, log=lambda *a: None)
    return home


def test_fleet_identities_are_distinct_and_pass_the_certificate_checks(fleet_home):
    reg = json.loads((fleet_home / "registry.json").read_text())
    keys = I.load_keys(fleet_home)
    assert sorted(reg["devices"]) == I.fleet_ids(N) == sorted(keys)
    pubs = {e["public_key"] for e in reg["devices"].values()}
    assert len(pubs) == N  # one key per module
    checker = certs.DeviceCertChecker((fleet_home / "ca" / "ca.crt.pem").read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    for dev in ("FLT-00001", "FLT-00%d" % N):
        cert = x509.load_pem_x509_certificate(reg["devices"][dev]["certificate"].encode())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            "urn:serene:device:" + dev]
        assert cert.public_key() == keys[dev].public_key()
        checker.check(dev, cert, now, registered=False)  # chain, SAN, CN, key usage
        with pytest.raises(VerifyError):
            checker.check("FLT-09999", cert, now, registered=False)
    creds = json.loads((fleet_home / "broker" / "credentials.json").read_text())
    assert set(I.fleet_ids(N)) <= set(creds["devices"])
    # Written once: a second call makes nothing new and keeps every key.
    before = (fleet_home / "fleet" / "keys.json").read_text()
    I.provision_fleet(fleet_home, N, log=lambda *a: None)
    assert (fleet_home / "fleet" / "keys.json").read_text() == before


def _module(fleet_home):
    """A SimModule whose epoch keys are known (its server side derived here)."""
    server_pub = sim.load_server_pub(fleet_home)
    fleet = sim.Fleet(fleet_home, 0, [], {}, server_pub, log=lambda *a: None)
    dev = "FLT-00001"
    m = sim.SimModule(fleet, 0, dev, I.load_keys(fleet_home)[dev],
                      I.device_certificate_der(fleet_home, dev), "pw", 1_000_000, None)
    m.epoch_record()
    m.subscribed = False  # publish() sends nothing: there is no connection here
    return fleet, m


def _ack(m, cum, bitmap, piv, key=None, epoch=None):
    return vp.seal(vp.ack_plaintext(m.epoch if epoch is None else epoch, cum, bitmap), piv,
                   key or m.keys.ack_key, m.keys.ack_iv, m.devb, m.epoch)


def test_module_refuses_forged_replayed_and_overclaiming_acks(fleet_home):
    fleet, m = _module(fleet_home)
    m.send_new([(0, sim.K_EPOCH, b"e")], time.monotonic())
    for s in range(1, 6):
        m.produce(time.monotonic())
    assert m.next_seq == 6 and sorted(m.outbox) == [0, 1, 2, 3, 4, 5]
    m.on_ack(_ack(m, 3, 0, 100, key=bytes(16)), time.monotonic())  # wrong key
    assert fleet.errors["forged_acks"] == 1 and len(m.outbox) == 6
    m.on_ack(_ack(m, 9, 0, 101), time.monotonic())  # claims seqs 6..9: never sent
    assert fleet.errors["acks_claiming_unsent"] == 1 and len(m.outbox) == 6
    m.on_ack(_ack(m, 2, 0b1000, 102), time.monotonic())  # bit 3 = seq 7: never sent
    assert fleet.errors["acks_claiming_unsent"] == 2 and len(m.outbox) == 6
    m.on_ack(_ack(m, 2, 0b10, 103), time.monotonic())  # 0..2 and 5 (bit 1 = cum + 3)
    assert sorted(m.outbox) == [3, 4] and fleet.objects_acked == 4 and m.cum == 2
    m.on_ack(_ack(m, 5, 0, 103), time.monotonic())  # same PIV again: a replay
    assert fleet.errors["replayed_acks"] == 1 and sorted(m.outbox) == [3, 4]
    m.on_ack(_ack(m, 1, 0, 104), time.monotonic())  # cum goes back
    assert fleet.errors["ack_regressions"] == 1
    m.on_ack(_ack(m, 5, 0, 105, epoch=m.epoch + 1), time.monotonic())  # another epoch's
    assert fleet.errors["bad_acks"] == 1 and sorted(m.outbox) == [3, 4]
    m.on_ack(_ack(m, 5, 0, 106), time.monotonic())
    assert not m.outbox and fleet.objects_acked == 6 and len(fleet.latencies) == 6


def test_checkpoints_cover_the_records_and_chain(fleet_home):
    fleet, m = _module(fleet_home)
    fleet.checkpoint_every = 3
    for _ in range(3):
        m.produce(time.monotonic())
    # seqs 1..3 records, 4 the checkpoint over them, prev = the epoch record's hash
    kind, cp = m.outbox[4][:2]
    assert kind == sim.K_CHECKPOINT
    payload = cbor2.loads(cbor2.loads(cp).value[2])
    assert payload[3:6] == [4, 1, 3]
    assert payload[6] == vp.chain_hash(sorted((s, m.outbox[s][1]) for s in (1, 2, 3)))


def _stop(p):
    p.terminate()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return out


def test_fleet_of_200_against_serene_server_stores_everything_exactly_once(fleet_home,
                                                                           tmp_path, procs):
    server = subprocess.Popen(SERENE + ["server", "--home", str(fleet_home), "--duration",
                                        "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    procs.append(server)
    ready, _, _ = select.select([server.stdout], [], [], 60)  # bounded: a stuck start fails
    assert ready, "serene server printed nothing in 60 s"
    line = server.stdout.readline()
    assert line.startswith("serene server: %d registered devices" % N), line
    out = tmp_path / "fleet.json"
    res = subprocess.run(SERENE + ["fleet", "--home", str(fleet_home), "--modules", str(N),
                                   "--rate", "2", "--seconds", "5", "--checkpoint-every", "4",
                                   "--connect-rate", "400", "--drain", "30", "--json",
                                   str(out)], capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(out.read_text())
    for name in ("connect_refused", "forged_acks", "replayed_acks", "bad_acks",
                 "acks_claiming_unsent", "ack_regressions", "unacked_at_end"):
        assert rep["errors"][name] == 0, (name, rep["errors"])
    assert rep["lost"] == 0 and rep["connected"] == N
    # ~5 s x 2 records + checkpoints + the epoch record, per module.
    sent = {dev: d["last_seq"] for dev, d in rep["devices"].items()}
    assert len(sent) == N and min(sent.values()) >= 10
    assert rep["objects_sent"] - rep["errors"]["retransmissions"] <= sum(
        s + 1 for s in sent.values()) <= rep["objects_sent"]
    assert rep["objects_acked"] == sum(s + 1 for s in sent.values())
    assert all(d["cum"] == d["last_seq"] and d["unacked"] == 0 for d in rep["devices"].values())
    assert rep["ack_latency_ms"]["p95"] is not None
    kinds = rep["ack_latency_ms_by_kind"]
    assert kinds["epoch"]["n"] == N and kinds["record"]["n"] >= 9 * N
    assert sum(k["n"] for k in kinds.values()) == rep["objects_acked"]

    _stop(server)
    db = sqlite3.connect("file:%s?mode=ro" % (fleet_home / "server" / "ingest.sqlite3"),
                         uri=True)
    epoch = I.FIRST_EPOCH + rep["run"]
    stored = {}
    for dev, ep, seq in db.execute("SELECT device, epoch, seq FROM objects WHERE epoch = ?",
                                   (epoch,)):
        stored.setdefault(dev, []).append(seq)
    for dev, last in sent.items():
        # Exactly the objects sent, once each (a retransmission stored as a duplicate only).
        assert sorted(stored.get(dev, [])) == list(range(last + 1)), dev
    assert set(stored) == set(sent)
    rejects = db.execute("SELECT reason, COUNT(*) FROM rejects GROUP BY reason").fetchall()
    assert rejects == [], rejects
    led = subprocess.run(SERENE + ["report", "--home", str(fleet_home), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert led.returncode == 0, led.stderr
    ledger = json.loads(led.stdout)["devices"]
    for dev in sent:
        d = ledger[dev]
        assert d["complete"] and d["missing"] == 0 and d["rejected"] == 0, d
        ep = [e for e in d["epochs"] if e["epoch"] == epoch][0]
        assert ep["gaps"] == [] and ep["checkpoints"]["mismatch"] == 0
        assert ep["checkpoints"]["pending"] == 0 and ep["checkpoints"]["verified"] >= 3


def test_rto_follows_the_measured_round_trips_but_not_retransmitted_ones(fleet_home):
    fleet, m = _module(fleet_home)
    assert m.rto == fleet.ack_timeout == 3.0
    for _ in range(20):
        m.sample_rtt(0.05)
    assert m.rto == 3.0  # never below --ack-timeout
    for _ in range(20):
        m.sample_rtt(8.0)  # the server's queue grows: the timer follows it
    assert 8.0 < m.rto <= sim.RTO_MAX_S
    fleet2, m2 = _module(fleet_home)
    t = time.monotonic()
    m2.send_new([(0, sim.K_EPOCH, b"e")], t)
    m2.subscribed = True
    m2.publish = lambda objs: None  # no connection: count what would be sent
    m2.retransmit_due(t + 3.5)
    assert fleet2.errors["retransmissions"] == 1 and m2.rto == 6.0  # backed off
    m2.on_ack(_ack(m2, 0, 0, 1), t + 4.0)  # acked after a retransmission: not sampled
    assert m2.srtt is None and len(fleet2.latencies_retransmitted) == 1
