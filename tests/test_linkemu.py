"""The userspace LTE-M link emulator (serene.linkemu) with real sockets on loopback: round trip,
jitter without reordering, bandwidth, stalls, counters and capacity. Bounded: a few seconds."""

import socket
import socketserver
import threading
import time

import pytest

from serene.linkemu import LinkEmulator, MqttSplitter, tcpip_overhead


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class _Sink(socketserver.BaseRequestHandler):
    def handle(self):
        got = 0
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            got += len(data)
        self.request.sendall(str(got).encode())  # after the sender's EOF: how much came


@pytest.fixture
def server(request):
    handler = {"echo": _Echo, "sink": _Sink}[request.param]
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _conn(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _rtt(s, payload=b"x"):
    t = time.monotonic()
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += s.recv(65536)
    return (time.monotonic() - t) * 1000, got


@pytest.mark.parametrize("server", ["echo"], indirect=True)
def test_round_trip_and_jitter_never_reorder(server):
    with LinkEmulator(server, rtt_ms=150, jitter_ms=20, up_bps=0, down_bps=0) as emu:
        with _conn(emu.port) as s:
            rtts = [_rtt(s)[0] for _ in range(8)]
            # Many small writes back to back, each its own chunk, each with its own jitter:
            # they come back in order, byte for byte.
            blob = b"".join(b"%06d" % i for i in range(300))
            for i in range(0, len(blob), 6):
                s.sendall(blob[i:i + 6])
            got = b""
            deadline = time.monotonic() + 5
            while len(got) < len(blob) and time.monotonic() < deadline:
                got += s.recv(65536)
        st = emu.stats()
    assert all(125 <= r <= 260 for r in rtts), rtts  # 150 +- 20 ms, plus a loaded machine
    assert max(rtts) - min(rtts) > 2  # jitter is there
    assert got == blob
    assert st["up_bytes"] == st["down_bytes"] == 8 + len(blob)
    assert st["connections"] == 1


@pytest.mark.parametrize("server", ["sink"], indirect=True)
def test_uplink_bandwidth_is_the_token_bucket_rate(server):
    n = 60_000
    with LinkEmulator(server, rtt_ms=20, jitter_ms=0, up_bps=375_000, down_bps=0) as emu:
        with _conn(emu.port) as s:
            t = time.monotonic()
            s.sendall(b"\0" * n)
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(100)
            dt = time.monotonic() - t
        st = emu.stats()
        cap = emu.capacity_bytes(dt)
    assert int(reply) == n
    ideal = n * 8 / 375_000  # 1.28 s
    assert ideal * 0.95 <= dt <= ideal * 1.5 + 0.2, (dt, ideal)
    assert st["up_at_capacity_s"] > 0.8 * ideal  # the bucket was the bottleneck
    assert 0.8 <= n / cap <= 1.05, (n, cap)
    assert emu.capacity_bytes(2.0) == pytest.approx(93_750)


@pytest.mark.parametrize("server", ["echo"], indirect=True)
def test_a_packet_after_an_idle_spell_still_takes_its_serialisation_time(server):
    # 1,000 bytes at 100 kbit/s up and down: 80 ms each way, however idle the link was.
    with LinkEmulator(server, rtt_ms=0, jitter_ms=0, up_bps=100_000, down_bps=100_000) as emu:
        with _conn(emu.port) as s:
            time.sleep(0.3)
            rtt, got = _rtt(s, b"y" * 1000)
        st = emu.stats()
    assert got == b"y" * 1000
    assert 150 <= rtt <= 350, rtt
    assert st["up_at_capacity_s"] == pytest.approx(0.08)


@pytest.mark.parametrize("server", ["echo"], indirect=True)
def test_scheduled_stall_holds_both_directions_and_is_deducted_from_capacity(server):
    with LinkEmulator(server, rtt_ms=10, jitter_ms=0, up_bps=0, down_bps=0,
                      stall_at=[(0.3, 1.0)]) as emu:
        with _conn(emu.port) as s:
            before, _ = _rtt(s)
            time.sleep(0.35 - emu.stats()["elapsed_s"])  # inside the stall
            during, _ = _rtt(s)
            after, _ = _rtt(s)
        assert before < 50 and after < 50
        assert 850 <= during <= 1300, during  # waited out the rest of the stall
        assert emu.stalled_s(0, 5) == pytest.approx(1.0)
    emu2 = LinkEmulator(1, up_bps=375_000, stall_every_s=60, stall_s=2)
    emu2.t0 = time.monotonic()
    assert emu2.capacity_bytes(120) == pytest.approx(375_000 / 8 * (120 - 2))  # one at 60 s


@pytest.mark.parametrize("server", ["echo"], indirect=True)
def test_manual_hold_and_release(server):
    with LinkEmulator(server, rtt_ms=10, jitter_ms=0, up_bps=0, down_bps=0) as emu:
        with _conn(emu.port) as s:
            emu.hold()
            t = time.monotonic()
            s.sendall(b"ping")
            threading.Timer(0.5, emu.release).start()
            assert s.recv(10) == b"ping"
            assert time.monotonic() - t >= 0.45
        assert 0.45 <= emu.stats()["stalled_s"] <= 0.7


def test_mqtt_splitter_counts_packets_and_estimates_overhead():
    sp = MqttSplitter()
    publish = bytes([0x32, 0x05]) + b"\0\x01t\0\x01"  # PUBLISH QoS 1, 7 bytes
    puback = bytes([0x40, 0x02, 0, 1])
    stream = publish + puback + publish
    for i in range(len(stream)):  # one byte at a time: packets split anywhere
        sp.feed(stream[i:i + 1], float(i))
    assert sp.by_type == {"PUBLISH": 2, "PUBACK": 1}
    assert sp.bytes == len(stream) and sp.publish_sizes == [7, 7]
    assert sp.first_publish_at == 0.0  # its first byte
    assert tcpip_overhead([7, 4, 1400]) == 52 * 4
