"""The private Mosquitto (serene.broker) against the real broker: accounts, ACLs, restarts.

Each isolation claim is checked with a barrier: after the forbidden action, an allowed message
goes through the same connections; once it has arrived, the forbidden one (which Mosquitto
would have delivered first, in order) has not.
"""

import json
import os
import stat
import subprocess

import pytest

from serene import broker as B

DEVICES = ["dev-a", "dev-b"]


@pytest.fixture(scope="module")
def brk(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with B.Broker(home, DEVICES) as b:
        yield b


def probe(brk, who, **kw):
    if who == "server":
        creds = brk.server_credentials()
        return B.Probe(brk.server_port, creds["username"], creds["password"], **kw)
    creds = brk.credentials(who)
    return B.Probe(brk.port, creds["username"], creds["password"], **kw)


def test_password_hash_matches_mosquitto_passwd(tmp_path):
    # An independent implementation: mosquitto_passwd's own entry, recomputed from its salt.
    pw = tmp_path / "pw"
    pw.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "alice", "s3cret:x"], check=True)
    user, entry = pw.read_text().strip().split(":", 1)
    _, kind, iterations, salt, _ = entry.split("$")
    assert (user, kind) == ("alice", "7")
    import base64

    assert B.password_hash("s3cret:x", base64.b64decode(salt), int(iterations)) == entry


def test_credentials_are_private_stable_and_per_device(tmp_path):
    first = B.ensure_credentials(tmp_path, ["dev-a"])
    path = tmp_path / "broker" / "credentials.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = B.ensure_credentials(tmp_path, ["dev-a", "dev-b"])
    assert again["devices"]["dev-a"] == first["devices"]["dev-a"]
    assert again["server"] == first["server"]
    assert again["devices"]["dev-b"]["password"] != again["devices"]["dev-a"]["password"]
    assert json.loads(path.read_text()) == again


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "a b", B.SERVER_USER, "serene-server-0",
                                 "serene-hub", "SERENE-x", "x" * 65])
def test_unusable_device_ids_are_refused(tmp_path, bad):
    with pytest.raises(B.BrokerError):
        B.ensure_credentials(tmp_path, [bad])


def test_anonymous_and_wrong_password_are_refused(brk):
    with pytest.raises(B.BrokerError, match="refused"):
        B.Probe(brk.port)
    with pytest.raises(B.BrokerError, match="refused"):
        B.Probe(brk.port, "dev-a", "not-the-password")
    with pytest.raises(B.BrokerError, match="refused"):
        B.Probe(brk.port, "nobody", brk.credentials("dev-a")["password"])


def test_each_account_authenticates_on_its_own_listener_only(brk):
    srv, dev = brk.server_credentials(), brk.credentials("dev-a")
    with pytest.raises(B.BrokerError, match="refused"):
        B.Probe(brk.port, srv["username"], srv["password"])  # server account, device listener
    with pytest.raises(B.BrokerError, match="refused"):
        B.Probe(brk.server_port, dev["username"], dev["password"])  # and the other way round
    with pytest.raises(B.BrokerError, match="refused"):
        B.Probe(brk.server_port)
    assert "dev-a" not in (brk.dir / "server.passwd").read_text()
    assert B.SERVER_USER not in (brk.dir / "devices.passwd").read_text()
    with probe(brk, "server"), probe(brk, "dev-a"):
        pass


def _takeover_loop(brk, attacker, victim_id, victim, watcher, up_dev, n=30):
    """`attacker` (a device account) connects n times with client id `victim_id`, while
    `up_dev`'s genuine connection publishes between attempts: `watcher` must receive every
    one of them, and neither the victim's nor the watcher's connection is ever closed."""
    creds = brk.credentials(attacker)
    sent = []
    for i in range(n):
        a = B.Probe(brk.port, creds["username"], creds["password"], client_id=victim_id)
        payload = b"genuine %d" % i
        up_dev.publish("serene/%s/up" % up_dev_id(up_dev), payload)
        sent.append(payload)
        a.close()
    got = []
    while len(got) < len(sent):
        msg = watcher.get(5)
        assert msg is not None, "received %d of %d" % (len(got), len(sent))
        got.append(msg[1])
    assert got == sent
    assert victim.disconnects == 0 and watcher.disconnects == 0 and up_dev.disconnects == 0


def up_dev_id(p):
    return p.client._client_id.decode()


def test_a_device_cannot_take_over_the_servers_client_id(brk):
    # Attack 1 of issue 8: a device account connecting with the server's client id made
    # Mosquitto close the server's connection. Now the device listener names every
    # connection after its account, and server client ids exist on the server listener only.
    with probe(brk, "server", client_id="serene-server-0") as srv, \
            probe(brk, "dev-a", client_id="dev-a") as a:
        assert srv.subscribe("serene/+/up") == 1
        _takeover_loop(brk, "dev-b", "serene-server-0", srv, srv, a)


def test_a_device_cannot_take_over_another_devices_connection(brk):
    with probe(brk, "server", client_id="serene-server-0") as srv, \
            probe(brk, "dev-a", client_id="dev-a") as a:
        assert srv.subscribe("serene/+/up") == 1
        assert a.subscribe("serene/dev-a/down") == 1
        _takeover_loop(brk, "dev-b", "dev-a", a, srv, a)
        srv.publish("serene/dev-a/down", b"still here")  # the victim still receives
        assert a.get() == ("serene/dev-a/down", b"still here")


def test_device_cannot_publish_to_another_devices_topics(brk):
    with probe(brk, "server") as srv, probe(brk, "dev-a") as a, probe(brk, "dev-b") as b:
        assert srv.subscribe("serene/+/up") == 1
        assert b.subscribe("serene/dev-b/down") == 1
        # Forbidden: impersonate dev-b's uplink; forge a downlink to dev-b or to itself.
        a.publish("serene/dev-b/up", b"forged uplink")
        a.publish("serene/dev-b/down", b"forged ack")
        a.publish("serene/dev-a/down", b"self ack")
        a.publish("serene/other", b"anything")
        # Barriers, allowed.
        a.publish("serene/dev-a/up", b"a1")
        srv.publish("serene/dev-b/down", b"real ack")
        assert srv.get() == ("serene/dev-a/up", b"a1")
        assert b.get() == ("serene/dev-b/down", b"real ack")
        assert srv.get(0.2) is None and b.get(0.2) is None


def test_device_cannot_read_another_devices_downlinks_or_uplinks(brk):
    with probe(brk, "server") as srv, probe(brk, "dev-a") as a, probe(brk, "dev-b") as b:
        # Mosquitto 2.0 grants a forbidden MQTT 3.1.1 subscription in the SUBACK and then
        # never delivers on it: what matters is delivery, checked below.
        for topic in ("serene/dev-b/down", "serene/+/up", "serene/+/down", "#"):
            assert a.subscribe(topic) in (0, 1, 128)
        assert a.subscribe("serene/dev-a/down") == 1
        assert srv.subscribe("serene/+/up") == 1
        srv.publish("serene/dev-b/down", b"for b only")
        b.publish("serene/dev-b/up", b"b's record")
        assert srv.get() == ("serene/dev-b/up", b"b's record")
        srv.publish("serene/dev-a/down", b"for a")  # barrier
        assert a.get() == ("serene/dev-a/down", b"for a")
        assert a.get(0.2) is None


def test_server_cannot_publish_uplinks(brk):
    # The server account writes only downlinks: it cannot inject records as a module.
    with probe(brk, "server") as srv, probe(brk, "dev-a") as a:
        assert srv.subscribe("serene/+/up") == 1
        srv.publish("serene/dev-a/up", b"forged by server")
        a.publish("serene/dev-a/up", b"real")
        assert srv.get() == ("serene/dev-a/up", b"real")
        assert srv.get(0.2) is None


def test_broker_files_are_private_and_bounds_are_set(brk):
    assert stat.S_IMODE(os.stat(brk.dir).st_mode) == 0o700
    for name in ("credentials.json", "devices.passwd", "server.passwd", "devices.acl",
                 "server.acl", "mosquitto.conf"):
        assert stat.S_IMODE(os.stat(brk.dir / name).st_mode) == 0o600, name
    conf = (brk.dir / "mosquitto.conf").read_text()
    assert "max_packet_size %d" % B.MAX_PACKET in conf and B.MAX_PACKET < 2048
    for key in ("max_queued_bytes", "max_queued_messages", "max_inflight_messages"):
        assert key in conf


def test_a_packet_above_the_largest_frame_is_refused_by_the_broker(brk):
    with probe(brk, "server") as srv, probe(brk, "dev-a") as a:
        assert srv.subscribe("serene/+/up") == 1
        a.publish("serene/dev-a/up", b"\xa5" * 1024)  # the largest legitimate frame
        assert srv.get() == ("serene/dev-a/up", b"\xa5" * 1024)
        with pytest.raises(B.BrokerError):
            a.publish("serene/dev-a/up", b"\x00" * 4096)  # the broker disconnects its sender
        assert srv.get(0.5) is None


def test_restart_keeps_port_and_accounts(tmp_path):
    b = B.Broker(tmp_path, ["dev-a"]).start()
    try:
        port, creds = b.port, b.credentials("dev-a")
        b.stop()
        with pytest.raises(B.BrokerError):
            B.Probe(port, creds["username"], creds["password"], timeout=1)
        b.start()
        assert b.port == port
        with B.Probe(port, creds["username"], creds["password"]):
            pass
    finally:
        b.stop()
    assert not b.running()


def test_tls_listener_serves_the_pinned_certificate(tmp_path):
    from cryptography import x509

    with B.Broker(tmp_path, ["dev-a"], tls=True) as b:
        creds = b.credentials("dev-a")
        with B.Probe(b.tls_port, creds["username"], creds["password"],
                     tls_ca=b.dir / "tls" / "cert.pem"):
            pass
        # TLS only for the modules: no plain device listener at all.
        assert b.port is None and b.info()["port"] is None
        conf = (b.dir / "mosquitto.conf").read_text()
        assert conf.count("listener ") == 2 and conf.count("use_username_as_clientid true") == 1
        with pytest.raises(B.BrokerError):  # plain MQTT on the TLS port
            B.Probe(b.tls_port, creds["username"], creds["password"], timeout=1)
        srv = b.server_credentials()
        with B.Probe(b.server_port, srv["username"], srv["password"]):  # loopback, plain
            pass
        cert = x509.load_der_x509_certificate(b.cert_der.read_bytes())
        assert cert.subject == cert.issuer


def test_a_taken_port_is_chosen_again(tmp_path, monkeypatch):
    # The free port found is taken before Mosquitto binds it (another process won the race).
    import socket as so

    squat = so.socket()
    squat.bind(("127.0.0.1", 0))
    squat.listen()
    taken = squat.getsockname()[1]
    real_free_port = B.free_port
    ports = iter([taken])
    monkeypatch.setattr(B, "free_port", lambda host="127.0.0.1": next(ports, None)
                        or real_free_port(host))
    try:
        with B.Broker(tmp_path, ["dev-a"]) as b:
            assert b.port != taken and b.running()
        with pytest.raises(B.BrokerError, match="exited at start"):
            B.Broker(tmp_path, ["dev-a"], port=taken).start()  # a port asked for: no retry
    finally:
        squat.close()
