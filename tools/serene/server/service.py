"""The ingest on MQTT: one subscription per device, a quarantine for a flooding one, acks out.

    svc = IngestService(make_ingest, server_port, username, password, worker_id=0,
                        devices=["SRN-0001", ...]).start()   # or devices=callable
    svc.wait_idle(10)                   # tests, the bench: everything received is committed
    svc.stop()

One thread ("serene-ingest-<worker id>") owns the MQTT connections (paho, driven by this
module's own loop: no paho network thread) and the Ingest with its SQLite connection. A single
thread means no lock between receiving and processing, and no GIL convoy (a network thread
that gives the interpreter up at every recv() while a busy worker keeps it for the switch
interval): the sockets are drained between any two frames.

Two connections, so that a flooding device waits behind itself only, AT THE BROKER: Mosquitto
keeps one outgoing queue per session, so whatever the server does, an uplink of a good module
waits in the broker behind every message queued before it for the same session.
- The MAIN connection (client id serene-server-<worker id>) subscribes one filter per device,
  `$share/serene-<worker id>/serene/<id>/up` (QoS 1). `devices` is every account the broker
  knows (the CLI gives the registry and the broker's credentials: an unregistered account is
  subscribed too, so its uplinks reach the ingest and are counted as refused there).
- The QUARANTINE connection (serene-server-<worker id>-q) holds the subscriptions of the
  devices over their intake quota: more than Q_FRAMES frames or Q_BYTES bytes in a Q_WINDOW_S
  window, or a full per-device queue. To move a device, the server SUBSCRIBEs its filter on the
  quarantine connection, then (at the SUBACK) UNSUBSCRIBEs it on the main one; back after
  Q_QUIET_S without going over, in the other order. Both are members of the same SHARED
  subscription group, so during a move each message goes to exactly one of them: never to
  none (no gap), never to both (no duplicate, no reject counted twice). What a session had
  queued before an UNSUBSCRIBE is still delivered to it (Mosquitto keeps a session's queue).
- The loop reads the main socket first and looks at it again every Q_CHECK_EVERY packets read
  from the quarantine; the main devices are served round robin first; a quarantined device's
  frames (from either connection) wait in a queue of Q_DEVICE_QUOTA bytes and get a bounded
  share of each turn (Q_SHARE_MAX frames or Q_SHARE_S), none while the main socket has
  something; beyond the quota they are refused ("quarantined"), counted in the ledger and
  PUBACKed after the commit that made the count durable (within Q_COMMIT_S). Refusing costs a
  counter, so the server drains the quarantine session as fast as the broker delivers it and
  Mosquitto's queue for it stays short (its hard bounds are serene.broker MAX_QUEUED_*).
- Both sessions are persistent. On every (re)connect the quarantine is rebuilt from scratch:
  the main connection subscribes every device, then the quarantine connection unsubscribes
  every device; what either session had queued is delivered and processed all the same.
Without `devices` (tests, older callers) the main connection subscribes `serene/+/up` and
there is no quarantine (a wildcard cannot be split per device).

Nothing the broker accepted disappears:
- paho's automatic PUBACK is off (manual_ack): an uplink is PUBACKed, on the connection it came
  from, only after ingest.commit() made its effect durable. A server killed at any instant
  leaves every un-PUBACKed uplink with the broker, which delivers it again to the next process
  with the same client ids (and holds, bounded, what arrives meanwhile).
- What is received waits in a queue per device, bounded by BYTES: DEVICE_QUOTA per device,
  Q_DEVICE_QUOTA per quarantined device and MEMORY_BOUND in all. An uplink over a bound is
  refused: ingest.refuse(device, "queue full" / "quarantined" / "server busy", size) counts it
  in the ledger, and it is PUBACKed after the commit that made the count durable (else the
  broker would hold it in the session's in-flight window forever and starve everyone behind
  it). Modules keep every object until a sealed ack covers it, so a refused frame of a
  genuine module comes again.
- A QoS-0 uplink (modules always use QoS 1) is refused and counted ("qos 0"): there is no
  PUBACK to hold back, so it could not be delivered safely.
- On a lost connection the uplinks received on it and not yet processed or counted are
  forgotten: none was PUBACKed, and the persistent session delivers them again.

Fair between devices: the worker takes one frame per device per turn (round robin over the
devices that have something queued). A batch is up to BATCH_S of work or BATCH_MAX frames, or
fewer when the queues run dry; then one commit, then the batch's acks are published and its
uplinks (refused ones included) PUBACKed. Deferred acks (ingest.due_acks(), the Partial IV
tick) are fetched every loop turn (<= IDLE_S apart).
"""

import collections
import logging
import select
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from .ingest import device_from_topic

log = logging.getLogger("serene.server")

UP_FILTER = "serene/+/up"
#: Bytes of uplink payload one device may have waiting in the server; beyond it, refused.
#: 64 KiB = 64 full LTE-M frames: a module's whole link window (64 objects) with room to spare.
DEVICE_QUOTA = 64 * 1024
#: Bytes of uplink payload waiting in all (any number of devices); beyond it, refused.
MEMORY_BOUND = 32 * 1024 * 1024
#: One batch: at most this long of processing, or this many frames, then a commit. A batch
#: that served a light device (its queue emptied by the frame: a module that sends what it
#: has and waits for the ack) ends as soon as it is BATCH_MIN_S old, so a module waits for
#: one busy device's frame and a commit, not for a whole batch of a flooding one; under a fleet
#: of light devices that still means at most 1 / BATCH_MIN_S commits a second.
BATCH_S = 0.010
BATCH_MIN_S = 0.002
BATCH_MAX = 256
#: Longest wait for the network when there is nothing to do (also the due_acks() period).
IDLE_S = 0.010
#: Packets read from a socket in one go before the worker processes a frame again.
READ_BURST = 4096
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.5, 10.0
KEEPALIVE_S = 30
LATENCY_KEEP = 10000
#: The intake quota: a device over Q_FRAMES frames or Q_BYTES bytes in a window of Q_WINDOW_S
#: (or whose queue is full) is quarantined. A module sends at most its link window (64 objects,
#: fewer frames) in a burst, then waits for acks: 200 frames in a second is no module.
Q_WINDOW_S = 1.0
Q_FRAMES = 200
Q_BYTES = 128 * 1024
#: A quarantined device comes back to the main connection after this long under its quota.
Q_QUIET_S = 5.0
#: Bytes of a quarantined device waiting in the server (4 full frames); beyond, refused.
Q_DEVICE_QUOTA = 4 * 1024
#: The quarantine's share of a turn: at most this many frames, this long, none while the main
#: socket has something to read.
Q_SHARE_MAX = 4
Q_SHARE_S = 0.002
#: Refusals alone (no frame processed) wait at most this long for their commit and PUBACKs.
Q_COMMIT_S = 0.020
Q_COMMIT_MAX = 2000
#: Quarantine packets read between two looks at the main socket.
Q_CHECK_EVERY = 8
#: Topic filters per SUBSCRIBE / UNSUBSCRIBE packet, and their bytes: the packet must fit the
#: broker's max_packet_size (serene.broker.MAX_PACKET, 1280), which disconnects a larger one
#: (64 filters of $share/serene-0/serene/<8-char id>/up are ~2,400 bytes).
SUB_CHUNK = 64
SUB_BYTES = 1024
#: How often `devices` (when a callable) is asked again for new accounts.
DEVICES_REFRESH_S = 5.0


def shared_filter(group, device):
    return "$share/%s/serene/%s/up" % (group, device)


class _Client(mqtt.Client):
    """paho's client with a buffered socket read: paho asks for 1 byte (the command), 1-4 bytes
    (the length), then the rest of each packet, one recv() each; this serves them from one
    64 KiB recv(). Only this module's own loop drives it (buffered() tells it data waits)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._rbuf = bytearray()

    def _sock_recv(self, bufsize):
        if not self._rbuf:
            self._rbuf += super()._sock_recv(65536)  # BlockingIOError when nothing is there
            if not self._rbuf:
                return b""  # the connection closed
        out = bytes(self._rbuf[:bufsize])
        del self._rbuf[:bufsize]
        return out

    def buffered(self):
        sock = self._sock
        return bool(self._rbuf) or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)

    def _sock_close(self):
        self._rbuf.clear()
        super()._sock_close()


class _Conn:
    """One MQTT connection of the service: the main one or the quarantine."""

    def __init__(self, svc, role, client_id, username, password, tls_ca):
        self.role, self.client_id = role, client_id
        self.gen = 0  # connection generation: a mid is PUBACKed only on its own connection
        self.first = True
        self.delay, self.next_connect = RECONNECT_MIN_S, 0.0
        self.ready = False  # its subscriptions are as the service wants them
        self.pending = {}  # SUBSCRIBE / UNSUBSCRIBE mid -> callback at its SUBACK / UNSUBACK
        c = self.client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=False, protocol=mqtt.MQTTv311, manual_ack=True)
        c.username_pw_set(username, password)
        # Acks to the modules go out at QoS 1: paho's default of 20 in flight would make a
        # burst of acks wait for the broker's PUBACKs in paho's memory.
        c.max_inflight_messages_set(1000)
        if tls_ca:
            c.tls_set(ca_certs=str(tls_ca))
        c.on_connect = lambda cl, u, flags, reason, props: svc._on_connect(self, flags, reason)
        c.on_disconnect = lambda cl, u, flags, reason, props: svc._on_disconnect(self, reason)
        c.on_message = lambda cl, u, msg: svc._on_message(self, msg)
        c.on_subscribe = lambda cl, u, mid, reasons, props: self._done(mid, reasons, "sub")
        c.on_unsubscribe = lambda cl, u, mid, reasons, props: self._done(mid, reasons, "unsub")

    @property
    def sock(self):
        return self.client._sock

    def _done(self, mid, reasons, op):
        if op == "sub" and any(getattr(r, "is_failure", False) for r in (reasons or ())):
            log.error("%s: the broker refused a subscription: %s", self.client_id, reasons)
        cb = self.pending.pop(mid, None)
        if cb is not None:
            cb()

    def request(self, op, filters, then=None):
        """SUBSCRIBE (op "sub", QoS 1) or UNSUBSCRIBE the filters, SUB_CHUNK per packet;
        then() once the broker acknowledged them all on this connection (never if it is lost
        meanwhile: its reconnection starts over)."""
        filters = list(filters)
        chunks, size = [], SUB_BYTES
        for f in filters:
            n = 2 + len(f.encode()) + (op == "sub")  # length, filter, options byte
            if size + n > SUB_BYTES or len(chunks[-1]) >= SUB_CHUNK:
                chunks.append([])
                size = 0
            chunks[-1].append(f)
            size += n
        if not chunks:
            if then is not None:
                then()
            return True
        left = [len(chunks)]

        def one():
            left[0] -= 1
            if left[0] == 0 and then is not None:
                then()
        for ch in chunks:
            if op == "sub":
                rc, mid = self.client.subscribe([(f, 1) for f in ch])
            else:
                rc, mid = self.client.unsubscribe(ch)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return False
            self.pending[mid] = one
        return True


class _Queued:
    __slots__ = ("topic", "payload", "mid", "conn", "gen", "t")

    def __init__(self, topic, payload, mid, conn, gen, t):
        self.topic, self.payload, self.mid = topic, payload, mid
        self.conn, self.gen, self.t = conn, gen, t


class _Lane:
    """Per-device byte-bounded queues served round robin (the main devices, or the
    quarantined ones)."""

    def __init__(self):
        self.queues = {}  # device -> deque of _Queued
        self.bytes = collections.Counter()  # device -> payload bytes queued
        self.rr = collections.deque()  # devices with something queued, in turn order

    def put(self, dev, item):
        q = self.queues.get(dev)
        if q is None:
            q = self.queues[dev] = collections.deque()
        if not q:
            self.rr.append(dev)
        q.append(item)
        self.bytes[dev] += len(item.payload)

    def take(self):
        """(device, item, emptied) of the next device in turn."""
        dev = self.rr.popleft()
        q = self.queues[dev]
        item = q.popleft()
        self.bytes[dev] -= len(item.payload)
        if q:
            self.rr.append(dev)  # its next frame waits for everyone else's turn
            return dev, item, False
        del self.queues[dev]
        del self.bytes[dev]
        return dev, item, True

    def drop(self, conn):
        """Forget what came on `conn` (lost: none of it was PUBACKed); bytes dropped."""
        gone = 0
        for dev in list(self.queues):
            q = self.queues[dev]
            keep = collections.deque(it for it in q if it.conn is not conn)
            gone += sum(len(it.payload) for it in q if it.conn is conn)
            if keep:
                self.queues[dev] = keep
                self.bytes[dev] = sum(len(it.payload) for it in keep)
            else:
                del self.queues[dev]
                del self.bytes[dev]
        self.rr = collections.deque(d for d in self.rr if d in self.queues)
        return gone


_EMPTY = _Lane()


class IngestService:
    def __init__(self, make_ingest, port, username, password, host="127.0.0.1", worker_id=0,
                 client_id=None, tls_ca=None, device_quota=DEVICE_QUOTA,
                 memory_bound=MEMORY_BOUND, batch_s=BATCH_S, batch_max=BATCH_MAX,
                 devices=None, quarantine=True):
        """make_ingest: a callable returning the Ingest, called in the worker thread (SQLite
        connections belong to the thread that made them). port: the broker's SERVER listener
        (serene.broker Broker.server_port). client_id: serene-server-<worker_id> unless
        given; it names the persistent session, so a restarted worker resumes its own (the
        quarantine's is <client_id>-q). devices: the device ids to subscribe one by one (a
        list, or a callable asked again every DEVICES_REFRESH_S for new ones); None: the
        `serene/+/up` wildcard and no quarantine. quarantine=False: per-device subscriptions
        on the main connection only."""
        self.make_ingest = make_ingest
        self.host, self.port = host, port
        self.worker_id = worker_id
        self.client_id = client_id or "serene-server-%d" % worker_id
        self.group = "serene-%d" % worker_id
        self.device_quota, self.memory_bound = device_quota, memory_bound
        self.batch_s, self.batch_max = batch_s, batch_max
        self._devices_src = devices
        self.per_device = devices is not None
        # Figures (read by the CLI, the bench and tests; written by the worker only).
        self.processed = 0  # uplinks given to ingest.process
        self.acks_sent = 0
        self.refused = collections.Counter()  # reason -> uplinks refused at intake
        self.received = 0
        self.received_quarantine = 0  # of them, on the quarantine connection
        self.batches = 0
        self.disconnects = 0
        self.commit_failures = 0
        self.queued_bytes = 0
        self.queued_bytes_peak = 0
        self.quarantines = collections.Counter()  # device -> times it was quarantined
        #: device -> the last LATENCY_KEEP (received -> committed and acked) times, seconds
        self.latency = collections.defaultdict(lambda: collections.deque(maxlen=LATENCY_KEEP))
        #: batches that served main devices: (longest wait before processing, processing,
        #: commit + publish), seconds: where a main frame's intake latency goes
        self.stages = collections.deque(maxlen=LATENCY_KEEP)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        # The worker's state.
        self._main_lane, self._q_lane = _Lane(), _Lane()
        self._refusals = []  # (device, reason, size, conn, mid or None, gen), to commit
        self._refusals_t = None  # when the oldest of them was made
        self._known = set()  # devices subscribed on the main connection (or quarantined)
        self._quar = {}  # device -> "entering" | "in" | "leaving"
        self._win = {}  # device -> [window start, frames, bytes]
        self._last_over = {}  # device -> last time over its quota
        self._synced = False  # the quarantine connection holds only what _quar says
        self._next_refresh = 0.0
        self._next_release = 0.0
        self._q_next = 0.0  # when the quarantine's next share of processing may start
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._idle = threading.Condition()
        self._idle_now = False
        self._error = None
        self.ingest = None
        self._worker = threading.Thread(target=self._run, name="serene-ingest-%d" % worker_id,
                                        daemon=True)
        self.main = _Conn(self, "main", self.client_id, username, password, tls_ca)
        self.quarantine = None
        if self.per_device and quarantine:
            self.quarantine = _Conn(self, "quarantine", self.client_id + "-q", username,
                                    password, tls_ca)
        self._conns = [c for c in (self.main, self.quarantine) if c is not None]
        self.client = self.main.client  # the main connection's paho client (tests)

    @property
    def dropped(self):
        """Uplinks refused at intake (all reasons); each is a counted reject in the ledger."""
        return sum(self.refused.values())

    @property
    def quarantined(self):
        """The devices whose uplinks go to the quarantine connection now."""
        return sorted(self._quar)

    def start(self, timeout=10.0):
        self._worker.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError("ingest did not start: %s" % self._error)
        if not self.subscribed.wait(timeout):
            self.stop()
            raise RuntimeError("no subscription to the uplinks on %s:%d within %.0f s"
                               % (self.host, self.port, timeout))
        return self

    def stop(self, timeout=10.0):
        """Finish the batch in hand (committed, acked), then disconnect. What is still queued
        was never PUBACKed: the broker keeps it for the next start."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout)

    def wait_idle(self, timeout=10.0):
        """Block until everything received is processed, committed and acknowledged, and the
        sockets had nothing more to read (tests, the bench). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self._idle_now = False
            while not self._idle_now:
                left = deadline - time.monotonic()
                if left <= 0 or not self._worker.is_alive():
                    return False
                self._idle.wait(min(left, 0.1))
            return True

    # --- subscriptions -------------------------------------------------------------------

    def _device_list(self):
        src = self._devices_src
        try:
            devs = src() if callable(src) else src
            return sorted(set(devs or ()))
        except Exception:  # noqa: BLE001 - keep what is subscribed; try again later
            log.exception("listing the devices to subscribe")
            return sorted(self._known)

    def _filter(self, dev):
        return shared_filter(self.group, dev)

    def _resync(self):
        """Rebuild the quarantine from scratch (any (re)connect): the main connection
        subscribes every device, then the quarantine connection unsubscribes every device.
        Until then no device moves."""
        m, q = self.main, self.quarantine
        self._synced = False
        if m.sock is None:
            return
        if not self.per_device:
            m.request("sub", [UP_FILTER], then=self._main_ready)
            return
        self._known |= set(self._device_list())
        self._quar.clear()
        filters = [self._filter(d) for d in sorted(self._known)]

        def main_done():
            self._main_ready()
            # A session of a version that subscribed the wildcard: it would duplicate.
            m.request("unsub", [UP_FILTER])
            if q is not None and q.sock is not None and q.client.is_connected():
                q.request("unsub", filters, then=q_done)

        def q_done():
            q.ready = True
            self._synced = True

        m.request("sub", filters, then=main_done)

    def _main_ready(self):
        self.main.ready = True
        self.subscribed.set()

    def _refresh_devices(self, now):
        if not callable(self._devices_src) or now < self._next_refresh:
            return
        self._next_refresh = now + DEVICES_REFRESH_S
        new = set(self._device_list()) - self._known
        if new and self.main.ready:
            self._known |= new
            self.main.request("sub", [self._filter(d) for d in sorted(new)])
            log.info("%s: subscribed %d new devices", self.client_id, len(new))

    def _quarantine(self, dev):
        """Move `dev` to the quarantine connection: SUBSCRIBE there, then UNSUBSCRIBE on the
        main one (the shared group makes every message go to exactly one of the two)."""
        if not self._synced or dev in self._quar or dev not in self._known:
            return
        m, q = self.main, self.quarantine
        f = self._filter(dev)
        self._quar[dev] = "entering"
        self.quarantines[dev] += 1
        log.warning("%s: %s is over its intake quota: quarantined", self.client_id, dev)

        def entered():
            if self._quar.get(dev) == "entering":
                m.request("unsub", [f], then=moved)

        def moved():
            if self._quar.get(dev) == "entering":
                self._quar[dev] = "in"
        q.request("sub", [f], then=entered)

    def _release(self, now):
        """Devices quiet for Q_QUIET_S go back to the main connection: SUBSCRIBE there,
        then UNSUBSCRIBE on the quarantine one."""
        if now < self._next_release or not self._synced:
            return
        self._next_release = now + 0.25
        m, q = self.main, self.quarantine
        for dev, st in list(self._quar.items()):
            if st != "in" or now - self._last_over.get(dev, 0) < Q_QUIET_S:
                continue
            if dev in self._q_lane.queues:
                continue
            f = self._filter(dev)
            self._quar[dev] = "leaving"
            log.warning("%s: %s back under its quota: out of quarantine", self.client_id, dev)

            def back(dev=dev, f=f):
                if self._quar.get(dev) == "leaving":
                    q.request("unsub", [f], then=lambda: self._left(dev))
            m.request("sub", [f], then=back)

    def _left(self, dev):
        if self._quar.get(dev) == "leaving":
            del self._quar[dev]

    # --- callbacks (called by paho inside the worker's own loop) -----------------------

    def _on_connect(self, conn, flags, reason):
        if reason.is_failure:
            log.error("broker refused the server (%s): %s", conn.client_id, reason)
            return
        if conn is self.main:
            self.connected.set()
        if not flags.session_present:
            log.info("%s: new session at the broker", conn.client_id)
        self._resync()

    def _on_disconnect(self, conn, reason):
        conn.gen += 1
        conn.ready = False
        conn.pending.clear()
        self._synced = False
        if conn is self.main:
            self.connected.clear()
            self.subscribed.clear()
        # Nothing received on it was PUBACKed: the persistent session delivers it all again
        # (refusals included: counted when they come again, not twice).
        self.queued_bytes -= self._main_lane.drop(conn) + self._q_lane.drop(conn)
        self._refusals = [r for r in self._refusals if r[3] is not conn]
        if not self._stop.is_set():
            self.disconnects += 1
            log.warning("%s disconnected from the broker (%s); reconnecting", conn.client_id,
                        reason)

    def _on_message(self, conn, msg):
        self.received += 1
        if conn is not self.main:
            self.received_quarantine += 1
        payload = msg.payload
        size = len(payload)
        dev = device_from_topic(msg.topic) or "?"
        if msg.qos == 0:
            self._refuse(dev, "qos 0", size, conn, None)
            return
        if self.quarantine is not None:
            self._meter(dev, size)
        if dev in self._quar:
            lane, quota, reason = self._q_lane, Q_DEVICE_QUOTA, "quarantined"
        else:
            lane, quota, reason = self._main_lane, self.device_quota, "queue full"
        if lane.bytes[dev] + size > quota:
            self._refuse(dev, reason, size, conn, msg.mid)
            if lane is self._main_lane and self.quarantine is not None:
                self._last_over[dev] = time.monotonic()
                self._quarantine(dev)
            return
        if self.queued_bytes + size > self.memory_bound:
            self._refuse(dev, "server busy", size, conn, msg.mid)
            return
        lane.put(dev, _Queued(msg.topic, payload, msg.mid, conn, conn.gen, time.monotonic()))
        self.queued_bytes += size
        if self.queued_bytes > self.queued_bytes_peak:
            self.queued_bytes_peak = self.queued_bytes

    def _meter(self, dev, size):
        """Count the device's uplinks in its window; over the quota: quarantine."""
        now = time.monotonic()
        w = self._win.get(dev)
        if w is None or now - w[0] >= Q_WINDOW_S:
            w = self._win[dev] = [now, 0, 0]
        w[1] += 1
        w[2] += size
        if w[1] > Q_FRAMES or w[2] > Q_BYTES:
            self._last_over[dev] = now
            if dev not in self._quar:
                self._quarantine(dev)

    def _refuse(self, dev, reason, size, conn, mid):
        self.refused[reason] += 1
        if not self._refusals:
            self._refusals_t = time.monotonic()
        self._refusals.append((dev, reason, size, conn, mid, conn.gen))

    # --- the worker's loop ---------------------------------------------------------------

    def _connect(self, conn):
        """Connect `conn` if it is down and its back-off allows; False while it is down."""
        if conn.sock is not None:
            return True
        now = time.monotonic()
        if now < conn.next_connect:
            return False
        try:
            if conn.first:
                conn.client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
                conn.first = False
            else:
                conn.client.reconnect()
            conn.client.socket().setblocking(False)
            conn.delay = RECONNECT_MIN_S
            return True
        except (OSError, ValueError) as e:
            log.warning("%s: cannot reach the broker on %s:%d: %s", conn.client_id,
                        self.host, self.port, e)
            conn.next_connect = now + conn.delay
            conn.delay = min(conn.delay * 2, RECONNECT_MAX_S)
            return False

    def _run(self):
        try:
            self.ingest = self.make_ingest()
        except Exception as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                up = [self._connect(c) for c in self._conns]
                if not any(up):
                    self._stop.wait(IDLE_S * 10)
                    continue
                self._turn()
            self._finish_batch([], [], force=True)  # refused meanwhile: counted, PUBACKed
        except Exception:  # noqa: BLE001 - logged; the thread must not die silently
            log.exception("%s: the ingest loop failed", self.client_id)
            self._error = "the ingest loop failed (see the log)"
        finally:
            for conn in self._conns:
                try:
                    conn.client.disconnect()
                    self._write(conn, 1.0)
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
                conn.client._sock_close()
            self.connected.clear()
            self.subscribed.clear()
            try:
                self.ingest.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the ingest")
            with self._idle:
                self._idle.notify_all()

    def _turn(self):
        """One loop turn: read (main first), process one batch (main devices round robin,
        then the quarantine's share), commit, publish, PUBACK."""
        m, q = self.main, self.quarantine
        now = time.monotonic()
        if not self._main_lane.rr:
            # Nothing of the main devices to do: wait for the network, at most until the
            # refusals' commit or the quarantine's share is due.
            wake = now + IDLE_S
            if self._refusals:
                wake = min(wake, self._refusals_t + Q_COMMIT_S)
            if self._q_lane.rr:
                wake = min(wake, self._q_next)
            if wake > now:
                self._wait_network(wake - now)
        self._read(m)
        if q is not None and not self._main_lane.rr:
            self._read(q, yield_to=m)  # never while a main frame waits
        now = time.monotonic()
        for conn in self._conns:
            if conn.sock is not None:
                conn.client.loop_misc()  # keepalive
        if self.quarantine is not None:
            self._release(now)
            self._refresh_devices(now)
        elif self.per_device:
            self._refresh_devices(now)
        acks, mids, done, waits = [], [], [], []
        t0 = time.monotonic()
        n, light = 0, False
        lane = self._main_lane
        while lane.rr and n < self.batch_max:
            age = time.monotonic() - t0
            if age >= self.batch_s or (light and age >= BATCH_MIN_S):
                break
            dev, item, emptied = lane.take()
            light = light or emptied
            self.queued_bytes -= len(item.payload)
            waits.append(time.monotonic() - item.t)
            acks += self.ingest.process(item.topic, item.payload)
            self.processed += 1
            mids.append((item.conn, item.mid, item.gen))
            done.append((dev, item.t))
            n += 1
            self._read(m)  # keep the main socket drained between frames
        # The quarantine's share: a few frames every Q_COMMIT_S (so it causes at most
        # 1 / Q_COMMIT_S commits a second), never while the main socket has something.
        lane = self._q_lane
        t1, k = time.monotonic(), 0
        if lane.rr and t1 >= self._q_next:
            self._q_next = t1 + Q_COMMIT_S
        else:
            lane = _EMPTY
        while lane.rr and k < Q_SHARE_MAX and time.monotonic() - t1 < Q_SHARE_S:
            if self._readable(m, 0):
                break
            dev, item, _ = lane.take()
            self.queued_bytes -= len(item.payload)
            acks += self.ingest.process(item.topic, item.payload)
            self.processed += 1
            mids.append((item.conn, item.mid, item.gen))
            done.append((dev, item.t))
            k += 1
        tc = time.monotonic()
        if self._finish_batch(acks, mids):
            now = time.monotonic()
            for dev, t in done:
                self.latency[dev].append(now - t)
            if waits:
                self.stages.append((max(waits), tc - t0, now - tc))
        if not (self._main_lane.rr or self._q_lane.rr or self._refusals) and not any(
                c.client.want_write() for c in self._conns if c.sock is not None):
            with self._idle:
                if not any(self._readable(c, 0) for c in self._conns):
                    self._idle_now = True
                    self._idle.notify_all()

    def _finish_batch(self, acks, mids, force=False):
        """Commit what the batch did and the refusals (these alone wait up to Q_COMMIT_S or
        Q_COMMIT_MAX of them), then publish the acks and PUBACK on each uplink's connection."""
        try:
            due = self.ingest.due_acks()
        except Exception:  # noqa: BLE001 - never fatal; they come again at the next tick
            log.exception("due_acks")
            due = []
        if self._refusals and not (acks or mids or due or force):
            if (time.monotonic() - self._refusals_t < Q_COMMIT_S
                    and len(self._refusals) < Q_COMMIT_MAX):
                return False
        refusals, self._refusals = self._refusals, []
        for dev, reason, size, conn, mid, gen in refusals:
            self.ingest.refuse(dev, reason, size)
            if mid is not None:
                mids.append((conn, mid, gen))
        if not (acks or mids or due or refusals):
            return False
        try:
            self.ingest.commit()
        except Exception:  # noqa: BLE001 - the database failed: acknowledge nothing
            self.commit_failures += 1
            log.exception("%s: commit failed; the batch is not acknowledged", self.client_id)
            try:
                self.ingest.rollback()
            except Exception:  # noqa: BLE001
                pass
            # The broker resends un-PUBACKed uplinks only on a new connection: make them.
            for conn in self._conns:
                conn.client._sock_close()
                self._on_disconnect(conn, "commit failed")
            return False
        self.batches += 1
        m = self.main
        for topic, ack in acks + list(due):
            m.client.publish(topic, ack, qos=1)
            self.acks_sent += 1
        for conn, mid, g in mids:
            if g == conn.gen:
                conn.client.ack(mid, 1)
        for conn in self._conns:
            self._write(conn, 0)
        return True

    def stages_p95(self):
        """p95 in ms of the stages of the batches that served main devices: waiting before
        processing, processing the batch, commit + publish + PUBACK."""
        xs = list(self.stages)
        out = {}
        for i, name in enumerate(("wait", "process", "commit")):
            v = sorted(x[i] for x in xs)
            if v:
                out[name] = round(1000 * v[min(len(v) - 1, int(0.95 * len(v)))], 2)
        return out

    def latency_p95(self):
        """{device: p95 of (received -> committed, acked) in ms} over the last LATENCY_KEEP."""
        out = {}
        for dev, xs in list(self.latency.items()):
            xs = sorted(xs)
            if xs:
                out[dev] = round(1000 * xs[min(len(xs) - 1, int(0.95 * len(xs)))], 2)
        return out

    # --- network -------------------------------------------------------------------------

    def _readable(self, conn, timeout):
        sock = conn.sock
        if sock is None:
            return False
        if conn.client.buffered():
            return True
        try:
            r, _, _ = select.select([sock], [], [], timeout)
        except (OSError, ValueError):
            return True  # let the read notice and report the broken connection
        return bool(r)

    def _wait_network(self, timeout):
        rd, wr = [], []
        for conn in self._conns:
            sock = conn.sock
            if sock is None:
                continue
            if conn.client.buffered():
                return
            rd.append(sock)
            if conn.client.want_write():
                wr.append(sock)
        if not rd:
            return
        try:
            select.select(rd, wr, [], timeout)
        except (OSError, ValueError):
            pass

    def _read(self, conn, yield_to=None):
        """Read what `conn` has (up to READ_BURST packets); with yield_to, stop as soon as
        that connection has something (checked every Q_CHECK_EVERY packets)."""
        c = conn.client
        for i in range(READ_BURST):
            if yield_to is not None and i % Q_CHECK_EVERY == 0 and i \
                    and self._readable(yield_to, 0):
                break
            if c._sock is None or not self._readable(conn, 0):
                break
            if c.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
        if c._sock is not None and c.want_write():
            self._write(conn, 0)

    def _write(self, conn, timeout):
        """Write what paho holds; wait up to `timeout` s for the socket to take it all."""
        c = conn.client
        deadline = time.monotonic() + timeout
        while c._sock is not None and c.want_write():
            if c.loop_write() != mqtt.MQTT_ERR_SUCCESS or not c.want_write():
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                select.select([], [c._sock], [], min(left, IDLE_S))
            except (OSError, ValueError):
                break
