"""The fleet's modules and the one selector loop that drives all their MQTT connections.

A SimModule is a host-side module (like tests/test_server.py's FakeModule) with a link layer in
the firmware's spirit: an outbox of every object not yet acknowledged, a 64-object window
(what one ack's cum + bitmap can cover), retransmission after ack_timeout with exponential
backoff, and acks applied only after they open under the epoch's ack key with a partial IV
above the last one accepted (docs/wire-format.md §6.3). Every ack is also checked for what a
load generator can see and a module cannot: an ack that claims an object never sent, or that
un-acknowledges one (cum going back).

Connections: paho-mqtt (already the project's client) with its external-loop API, one
socket per module on one selectors.DefaultSelector (epoll): on_socket_open/close register the
socket, on_socket_register_write/unregister_write toggle write interest, loop_read/loop_write
on readiness, loop_misc (keepalive) over a slice of the clients every tick. No thread per
client, no socketpair per client (paho makes those only for loop()/loop_start()): one file
descriptor per module. aiomqtt would be the same paho under asyncio's loop (one dependency
more, the same work); gmqtt and amqtt are separate implementations we have no reason to add.
"""

import collections
import hashlib
import heapq
import random
import selectors
import socket
import time

import cbor2
import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .. import linkframe
from ..verifier import VerifyError
from ..verifier import protocol as vp

K_EPOCH, K_RECORD, K_CHECKPOINT = 0, 1, 2
MTU = 1024
MAX_ENTRIES = 64
#: Objects in flight past cum: an ack's bitmap reaches cum + 65, so 62 leaves slack.
WINDOW = 62
RTO_MAX_S = 30.0
ERRORS = ("connect_refused", "disconnects", "publish_failed", "forged_acks", "replayed_acks",
          "bad_acks", "other_epoch_acks", "acks_claiming_unsent", "ack_regressions",
          "timeouts", "retransmissions", "window_stalls", "unacked_at_end")


class SimModule:
    """One simulated module: identity, epoch, objects, outbox, ack checks."""

    def __init__(self, fleet, idx, dev, key, cert_der, password, epoch, prev):
        self.fleet = fleet
        self.idx = idx
        self.dev = dev
        self.devb = dev.encode()
        self.key = key
        self.cert_der = cert_der
        self.password = password
        self.epoch = epoch
        self.prev = prev
        self.keys = None
        self.client = None
        self.connected = False
        self.subscribed = False
        self.next_seq = 0
        self.cum = -1  # highest cum accepted (-1: nothing acknowledged yet)
        self.last_piv = -1
        self.outbox = {}  # seq -> [kind, bytes, first_sent, last_sent, rto]
        self.sealed = {}  # seq -> canonical sealed record since the last checkpoint
        self.cp_first = 1
        self.last_hash = None
        self.closed = None  # [epoch, seq, hash hex] of the closing checkpoint
        self.records = 0
        self.send_until = None
        self.finished = False  # stopped producing; closing checkpoint made
        self.done = False  # closed and acknowledged, or gave up: counted once in fleet.n_done
        self.gave_up = False
        self.rto_at = None  # when its earliest retransmission timer fires (the fleet's heap)
        self.rto = fleet.ack_timeout  # for new objects (sample_rtt)
        self.srtt = self.rttvar = None

    # --- objects -----------------------------------------------------------------------

    def _sign(self, payload, unprot):
        r, s = decode_dss_signature(
            self.key.sign(vp.sig_structure(payload), ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return cbor2.dumps(cbor2.CBORTag(18, [vp.PROTECTED_ES256, unprot, payload, sig]))

    def epoch_record(self):
        eph = ec.generate_private_key(ec.SECP256R1())
        z = eph.exchange(ec.ECDH(), self.fleet.server_pub)
        self.keys = vp.derive_keys(z, self.devb, self.epoch)
        q = eph.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.CompressedPoint)
        payload = cbor2.dumps([1, self.devb, self.epoch, 0, q, self.prev])
        self.last_hash = hashlib.sha256(payload).digest()
        self.next_seq = 1
        return self._sign(payload, {33: self.cert_der})

    def status_record(self, seq):
        # A status record (firmware/record.py labels): kind 1, seq, time, rate, volume.
        pt = cbor2.dumps({0: 1, 1: seq, -3: int(time.time()), 2: 1000 + self.idx % 500,
                          3: 100 * seq})
        return vp.seal(pt, seq, self.keys.record_key, self.keys.record_iv, self.devb,
                       self.epoch, with_kid=False)

    def checkpoint(self, close=False):
        seq = self.next_seq
        chain = vp.chain_hash(sorted(self.sealed.items()))
        payload = cbor2.dumps([2, self.devb, self.epoch, seq, self.cp_first, len(self.sealed),
                               chain, self.last_hash])
        self.last_hash = hashlib.sha256(payload).digest()
        self.next_seq += 1
        self.cp_first = seq + 1
        self.sealed = {}
        self.closed = [self.epoch, seq, self.last_hash.hex()]
        return seq, self._sign(payload, {})

    def outstanding(self):
        return self.next_seq - 1 - self.cum

    def produce(self, now):
        """One status record (and a checkpoint every N); False if the window is full."""
        if self.outstanding() + 2 > WINDOW:
            self.fleet.errors["window_stalls"] += 1
            return False
        seq = self.next_seq
        rec = self.status_record(seq)
        self.next_seq += 1
        self.sealed[seq] = rec
        self.records += 1
        new = [(seq, K_RECORD, rec)]
        if self.fleet.checkpoint_every and self.records % self.fleet.checkpoint_every == 0:
            cs, cp = self.checkpoint()
            new.append((cs, K_CHECKPOINT, cp))
        self.send_new(new, now)
        return True

    def finish(self, now):
        """End of the run: a closing checkpoint over what the last one did not cover."""
        self.finished = True
        if self.keys is None:
            return
        if self.sealed or self.closed is None:
            if self.outstanding() + 1 > WINDOW:
                return  # retried by the loop once acks make room
            cs, cp = self.checkpoint(close=True)
            self.send_new([(cs, K_CHECKPOINT, cp)], now)
        self.finished = "closed"
        self.fleet.check_done(self)

    # --- link layer ---------------------------------------------------------------------

    def send_new(self, objs, now):
        rto = self.rto
        for seq, kind, data in objs:
            self.outbox[seq] = [kind, data, now, now, rto, 0]  # ..., rto, retransmissions
        self.fleet.pending.add(self.idx)
        self.fleet.objects_sent += len(objs)
        self.arm(now + rto)
        self.publish([(seq, kind, data) for seq, kind, data in objs])

    def publish(self, objs):
        """objs: [(seq, kind, data)] in as few frames as the MTU and entry limit allow."""
        if not self.subscribed:
            return  # sent again from the outbox once (re)connected
        frames, cur, size = [], [], 0
        base = 1 + len(linkframe.uvarint(self.epoch))
        for seq, kind, data in objs:
            esize = 1 + len(linkframe.uvarint(seq)) + len(linkframe.uvarint(len(data))) \
                + len(data)
            if cur and (base + size + esize > MTU or len(cur) >= MAX_ENTRIES):
                frames.append(cur)
                cur, size = [], 0
            cur.append(linkframe.Entry(kind, seq, data, len(data)))
            size += esize
        if cur:
            frames.append(cur)
        for entries in frames:
            payload = linkframe.build(linkframe.Frame(self.epoch, tuple(entries)))
            info = self.client.publish("serene/%s/up" % self.dev, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self.fleet.errors["publish_failed"] += 1
            self.fleet.frames_sent += 1

    def arm(self, t):
        """Make sure a retransmission timer fires at t at the latest."""
        if self.rto_at is None or t < self.rto_at:
            self.rto_at = t
            self.fleet._at(t, "rto", self)

    def retransmit_due(self, now):
        due = []
        for seq, ob in self.outbox.items():
            if now - ob[3] >= ob[4]:
                due.append((seq, ob[0], ob[1]))
                ob[3] = now
                ob[4] = min(ob[4] * 2, RTO_MAX_S)
                ob[5] += 1
        if due:
            self.rto = min(self.rto * 2, RTO_MAX_S)  # back off, as TCP does on a timeout
            self.fleet.errors["timeouts"] += 1
            self.fleet.errors["retransmissions"] += len(due)
            self.publish(sorted(due))
        if self.outbox:
            self.arm(min(ob[3] + ob[4] for ob in self.outbox.values()))

    def resend_all(self, now):
        if self.outbox:
            for ob in self.outbox.values():
                ob[3] = now
            self.publish(sorted((s, ob[0], ob[1]) for s, ob in self.outbox.items()))

    def sample_rtt(self, r):
        """The retransmission timeout from the measured ack round trips (RFC 6298: SRTT +
        4 RTTVAR), never below --ack-timeout: queueing at the server raises it, so the fleet
        does not retransmit what is only waiting (copies are more load: a collapse)."""
        if not self.fleet.adaptive:
            return
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.rto = min(RTO_MAX_S, max(self.fleet.ack_timeout, self.srtt + 4 * self.rttvar))

    def on_ack(self, payload, now):
        f = self.fleet
        if self.keys is None or len(payload) > 80:
            f.errors["bad_acks"] += 1
            return
        try:
            s = vp.parse_sealed(payload)
            if s.kid is None:
                raise VerifyError("bad header", "no kid")
            piv, pt = vp.open_sealed(payload, self.keys.ack_key, self.keys.ack_iv, self.devb,
                                     self.epoch)
        except VerifyError as e:
            if e.reason == "forged":
                f.errors["forged_acks"] += 1
            elif e.reason == "other epoch":
                f.errors["other_epoch_acks"] += 1
            else:
                f.errors["bad_acks"] += 1
            return
        if piv <= self.last_piv:
            f.errors["replayed_acks"] += 1
            return
        try:
            acked, cum, bitmap = cbor2.loads(pt)
            if acked != self.epoch or min(cum, bitmap) < 0 or bitmap >> 64:
                raise ValueError("fields")
        except (ValueError, TypeError, cbor2.CBORDecodeError):
            f.errors["bad_acks"] += 1
            return
        self.last_piv = piv
        f.acks_received += 1
        highest = self.next_seq - 1
        top = cum + 1 + bitmap.bit_length() if bitmap else cum
        if cum > highest or top > highest:
            f.errors["acks_claiming_unsent"] += 1
            f.bad_claims.append((self.dev, cum, bitmap, highest))
            return
        if cum < self.cum:
            f.errors["ack_regressions"] += 1
            return
        newly = [s for s in self.outbox if s <= cum or (s >= cum + 2 and
                                                        bitmap >> (s - cum - 2) & 1)]
        for s in newly:
            ob = self.outbox.pop(s)
            f.latencies.append(now - ob[2])
            f.latencies_by_kind[ob[0]].append(now - ob[2])
            if ob[5]:  # sent again: its round trip is ambiguous (Karn), not sampled
                f.latencies_retransmitted.append(now - ob[2])
            else:
                self.sample_rtt(now - ob[2])
        f.objects_acked += len(newly)
        f.last_ack_at = now
        self.cum = cum
        if not self.outbox:
            f.pending.discard(self.idx)
            f.check_done(self)
        if cum >= 0 and self.next_seq == 1 and self.send_until is None:
            f.started(self, now)


class Fleet:
    """N SimModules on one selector. run() -> the report dict."""

    def __init__(self, home, port, modules, creds, server_pub, rate=1.0, seconds=10.0,
                 checkpoint_every=32, connect_rate=500.0, ack_timeout=3.0, drain_s=60.0,
                 host="127.0.0.1", keepalive=60, seed=None, log=print, adaptive=True):
        self.home = home
        self.port = port
        self.host = host
        self.rate = rate
        self.seconds = seconds
        self.checkpoint_every = checkpoint_every
        self.connect_rate = connect_rate
        self.ack_timeout = ack_timeout
        self.adaptive = adaptive  # rto from measured round trips (else fixed ack_timeout)
        self.drain_s = drain_s
        self.keepalive = keepalive
        self.server_pub = server_pub
        self.log = log
        self.rng = random.Random(seed)
        self.mods = modules  # [SimModule] built by the caller with fleet=self
        self.creds = creds
        self.sel = selectors.DefaultSelector()
        self.heap = []
        self.pending = set()
        self.errors = collections.Counter({k: 0 for k in ERRORS})
        self.latencies = []
        self.latencies_by_kind = {K_EPOCH: [], K_RECORD: [], K_CHECKPOINT: []}
        self.latencies_retransmitted = []  # of the objects acknowledged after a retransmission
        self.n_done = self.n_gave_up = 0
        self._n = 0  # heap tie-breaker
        self.stopping = False
        self.bad_claims = []
        self.objects_sent = self.objects_acked = self.frames_sent = self.acks_received = 0
        self.first_send_at = self.last_ack_at = None
        self.connected = 0

    # --- paho callbacks --------------------------------------------------------------

    def _client(self, m):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=m.dev,
                        protocol=mqtt.MQTTv311, clean_session=True, userdata=m)
        c.username_pw_set(m.dev, m.password)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.on_socket_open = self._sock_open
        c.on_socket_close = self._sock_close
        c.on_socket_register_write = self._sock_want_write
        c.on_socket_unregister_write = self._sock_no_write
        return c

    def _sock_open(self, client, m, sock):
        self.sel.register(sock, selectors.EVENT_READ, m)

    def _sock_close(self, client, m, sock):
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _sock_want_write(self, client, m, sock):
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, m)
        except (KeyError, ValueError):
            pass

    def _sock_no_write(self, client, m, sock):
        try:
            self.sel.modify(sock, selectors.EVENT_READ, m)
        except (KeyError, ValueError):
            pass

    def _on_connect(self, client, m, flags, reason, props):
        if reason.is_failure:
            self.errors["connect_refused"] += 1
            self.refused_reasons[str(reason)] += 1
            self.give_up(m)
            return
        m.connected = True
        self.connected += 1
        client.subscribe("serene/%s/down" % m.dev, qos=1)

    def _on_subscribe(self, client, m, mid, reasons, props):
        if any(r.is_failure for r in reasons):
            self.errors["connect_refused"] += 1
            self.refused_reasons["subscribe " + str(reasons[0])] += 1
            return
        m.subscribed = True
        now = time.monotonic()
        if m.keys is None:
            rec = m.epoch_record()
            m.send_new([(0, K_EPOCH, rec)], now)
        else:
            m.resend_all(now)  # a reconnection: what is not acknowledged goes again

    def _on_message(self, client, m, msg):
        m.on_ack(msg.payload, time.monotonic())

    def _on_disconnect(self, client, m, flags, reason, props):
        if m.connected:
            self.connected -= 1
        m.connected = m.subscribed = False
        if not self.stopping:
            self.errors["disconnects"] += 1
            self.disconnect_reasons[str(reason)] += 1
            self._at(time.monotonic() + 1.0, "reconnect", m)

    # --- schedule --------------------------------------------------------------------

    def _at(self, t, what, m):
        heapq.heappush(self.heap, (t, self._n, what, m))
        self._n += 1

    def give_up(self, m):
        if not m.gave_up:
            m.gave_up = True
            self.n_gave_up += 1
            self.check_done(m)

    def check_done(self, m):
        if not m.done and (m.gave_up or (m.finished == "closed" and not m.outbox)):
            m.done = True
            self.n_done += 1

    def started(self, m, now):
        """m's epoch record is acknowledged: it produces records from now on."""
        if self.first_send_at is None:
            self.first_send_at = now
        m.send_until = now + self.seconds
        if self.rate > 0:
            self._at(now + self.rng.random() / self.rate, "produce", m)
        else:
            self._at(m.send_until, "produce", m)

    def _event(self, what, m, now):
        if what == "connect":
            c = m.client = self._client(m)
            try:
                c.connect(self.host, self.port, keepalive=self.keepalive)
            except OSError as e:
                self.errors["connect_refused"] += 1
                self.refused_reasons[type(e).__name__] += 1
                self.give_up(m)
        elif what == "reconnect":
            if not self.stopping:
                try:
                    m.client.reconnect()
                except OSError:
                    self._at(now + 1.0, "reconnect", m)
        elif what == "produce":
            if now >= m.send_until:
                m.finish(now)
                if m.finished != "closed":
                    self._at(now + 0.2, "finish", m)
                return
            m.produce(now)
            self._at(max(now, self._t_next(m, now)), "produce", m)
        elif what == "rto":
            if m.rto_at is not None and now >= m.rto_at:
                m.rto_at = None
                if m.subscribed:
                    m.retransmit_due(now)
                elif m.outbox:
                    self._at(now + 0.5, "rto", m)  # sent again once reconnected
                    m.rto_at = now + 0.5
        elif what == "finish":
            m.finish(now)
            if m.finished != "closed" and not self.stopping:
                self._at(now + 0.2, "finish", m)

    def _t_next(self, m, now):
        return now + 1.0 / self.rate

    # --- the loop --------------------------------------------------------------------

    def run(self):
        self.refused_reasons = collections.Counter()
        self.disconnect_reasons = collections.Counter()
        t0 = time.monotonic()
        for i, m in enumerate(self.mods):
            self._at(t0 + i / self.connect_rate, "connect", m)
        connect_s = len(self.mods) / self.connect_rate
        # Bounded: connecting, the epoch acks, S seconds of records, then the drain.
        hard_end = t0 + connect_s + 30.0 + self.seconds + self.drain_s
        misc_i, next_sweep, next_print = 0, t0, t0 + 5.0
        connected_at = None
        loop_misc_slice = max(1, len(self.mods) // 20)
        while True:
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                _, _, what, m = heapq.heappop(self.heap)
                self._event(what, m, now)
            if now >= next_sweep:  # keepalives, a slice of the clients at a time
                next_sweep = now + 0.1
                for m in self.mods[misc_i:misc_i + loop_misc_slice]:
                    if m.client is not None:
                        m.client.loop_misc()
                misc_i = (misc_i + loop_misc_slice) % len(self.mods)
            if connected_at is None and self.connected + self.n_gave_up >= len(self.mods):
                connected_at = now
                self.log("serene fleet: %d connected in %.1f s" % (self.connected, now - t0))
            if now >= next_print:
                self.log("serene fleet: t=%.0f s connected %d sent %d acked %d pending %d"
                         % (now - t0, self.connected, self.objects_sent, self.objects_acked,
                            len(self.pending)))
                next_print = now + 5.0
            if self.n_done >= len(self.mods) or now >= hard_end:
                break
            nxt = min(self.heap[0][0] if self.heap else now + 0.05, next_sweep)
            timeout = min(max(0.0, nxt - now), 0.05)
            for key, mask in self.sel.select(timeout):
                c = key.data.client
                if mask & selectors.EVENT_READ:
                    c.loop_read(max_packets=10)
                if mask & selectors.EVENT_WRITE:
                    c.loop_write()
        t_end = time.monotonic()
        self.stopping = True
        for m in self.mods:
            self.errors["unacked_at_end"] += len(m.outbox)
        self._close_all()
        return self._report(t0, t_end, connected_at)

    def _close_all(self):
        for m in self.mods:
            if m.client is not None and m.connected:
                m.client.disconnect()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.sel.get_map():
            for key, mask in self.sel.select(0.05):
                c = key.data.client
                try:
                    if mask & selectors.EVENT_WRITE:
                        c.loop_write()
                    if mask & selectors.EVENT_READ:
                        c.loop_read()
                except (OSError, socket.error):
                    pass
        for key in list(self.sel.get_map().values()):
            try:
                key.fileobj.close()
            except OSError:
                pass
        self.sel.close()

    def _report(self, t0, t_end, connected_at):
        def pct(lat, p):
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(p / 100.0 * len(lat)))] * 1e3, 2)

        def dist(xs):
            xs = sorted(xs)
            return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "p99": pct(xs, 99),
                    "max": round(xs[-1] * 1e3, 2) if xs else None}

        span = (self.last_ack_at - self.first_send_at) if self.last_ack_at and \
            self.first_send_at else 0.0
        return {
            "modules": len(self.mods),
            "connected": sum(1 for m in self.mods if m.keys is not None),
            "rate_per_module": self.rate,
            "seconds": self.seconds,
            "checkpoint_every": self.checkpoint_every,
            "connect_s": round(connected_at - t0, 2) if connected_at else None,
            "run_s": round(t_end - t0, 2),
            "objects_sent": self.objects_sent,
            "objects_acked": self.objects_acked,
            "frames_sent": self.frames_sent,
            "acks_received": self.acks_received,
            "objects_per_s": round(self.objects_acked / span, 1) if span > 0 else None,
            "ack_latency_ms": dist(self.latencies),
            # The epoch records come in a burst at connection (each costs the server an ECDH
            # and a certificate check): their latency apart from the steady records'.
            "ack_latency_ms_by_kind": {name: dist(self.latencies_by_kind[k]) for k, name in
                                       ((K_EPOCH, "epoch"), (K_RECORD, "record"),
                                        (K_CHECKPOINT, "checkpoint"))},
            "ack_latency_ms_retransmitted": dist(self.latencies_retransmitted),
            "errors": dict(self.errors),
            "refused_reasons": dict(self.refused_reasons),
            "disconnect_reasons": dict(self.disconnect_reasons),
            "bad_claims": self.bad_claims[:20],
            "lost": self.errors["unacked_at_end"],
            "devices": {m.dev: {"epoch": m.epoch, "last_seq": m.next_seq - 1, "cum": m.cum,
                                "unacked": len(m.outbox)} for m in self.mods},
        }


def load_server_pub(home):
    cert = x509.load_pem_x509_certificate((home / "server" / "server.crt.pem").read_bytes())
    return cert.public_key()
