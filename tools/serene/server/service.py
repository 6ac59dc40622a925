"""The ingest on MQTT: subscribe to `serene/+/up`, hand each uplink to Ingest, publish acks.

    svc = IngestService(make_ingest, server_port, username, password, worker_id=0).start()
    svc.wait_idle(10)                   # tests, the bench: everything received is committed
    svc.stop()

One thread ("serene-ingest-<worker id>") owns the MQTT connection (paho, driven by this
module's own loop: no paho network thread) and the Ingest with its SQLite connection. A single
thread means no lock between receiving and processing, and no GIL convoy (a network thread
that gives the interpreter up at every recv() while a busy worker keeps it for the switch
interval): the socket is drained between any two frames.

Nothing the broker accepted disappears:
- The server's session is persistent (clean session off, client id serene-server-<worker id>,
  QoS-1 subscription) and paho's automatic PUBACK is off (manual_ack): an uplink is PUBACKed
  only after ingest.commit() made its effect durable. A server killed at any instant leaves
  every un-PUBACKed uplink with the broker, which delivers it again to the next process with the
  same client id (and holds, bounded, what arrives meanwhile: serene.broker MAX_QUEUED_*).
- What is received waits in a queue per device, bounded by BYTES: DEVICE_QUOTA per device and
  MEMORY_BOUND in all. An uplink over either bound is refused: ingest.refuse(device,
  "queue full" / "server busy", size) counts it in the ledger, and it is PUBACKed after the
  commit that made the count durable (else the broker would hold it in the server's in-flight
  window forever and starve everyone behind it). Modules keep every object until a sealed ack
  covers it, so a refused frame of a genuine module comes again.
- A QoS-0 uplink (modules always use QoS 1) is refused and counted ("qos 0"): there is no
  PUBACK to hold back, so it could not be delivered safely.
- On a lost connection the queued, not yet processed uplinks are forgotten: none was PUBACKed,
  and the persistent session delivers them again on the next connection.

Fair between devices: the worker takes one frame per device per turn (round robin over the
devices that have something queued), so a device that floods waits behind itself only. A batch
is up to BATCH_S of work or BATCH_MAX frames, or fewer when the queues run dry; then one commit,
then the batch's acks are published and its uplinks (refused ones included) PUBACKed. Deferred
acks (ingest.due_acks(), the Partial IV tick) are fetched every loop turn (<= IDLE_S apart).
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
#: Packets read from the socket in one go before the worker processes a frame again.
READ_BURST = 4096
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.5, 10.0
KEEPALIVE_S = 30
LATENCY_KEEP = 10000


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


class _Queued:
    __slots__ = ("topic", "payload", "mid", "gen", "t")

    def __init__(self, topic, payload, mid, gen, t):
        self.topic, self.payload, self.mid, self.gen, self.t = topic, payload, mid, gen, t


class IngestService:
    def __init__(self, make_ingest, port, username, password, host="127.0.0.1", worker_id=0,
                 client_id=None, tls_ca=None, device_quota=DEVICE_QUOTA,
                 memory_bound=MEMORY_BOUND, batch_s=BATCH_S, batch_max=BATCH_MAX):
        """make_ingest: a callable returning the Ingest, called in the worker thread (SQLite
        connections belong to the thread that made them). port: the broker's SERVER listener
        (serene.broker Broker.server_port). client_id: serene-server-<worker_id> unless
        given; it names the persistent session, so a restarted worker resumes its own."""
        self.make_ingest = make_ingest
        self.host, self.port = host, port
        self.worker_id = worker_id
        self.client_id = client_id or "serene-server-%d" % worker_id
        self.device_quota, self.memory_bound = device_quota, memory_bound
        self.batch_s, self.batch_max = batch_s, batch_max
        # Figures (read by the CLI, the bench and tests; written by the worker only).
        self.processed = 0  # uplinks given to ingest.process
        self.acks_sent = 0
        self.refused = collections.Counter()  # reason -> uplinks refused at intake
        self.received = 0
        self.batches = 0
        self.disconnects = 0
        self.commit_failures = 0
        self.queued_bytes = 0
        self.queued_bytes_peak = 0
        #: device -> the last LATENCY_KEEP (received -> committed and acked) times, seconds
        self.latency = collections.defaultdict(lambda: collections.deque(maxlen=LATENCY_KEEP))
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        # The worker's state.
        self._queues = {}  # device -> deque of _Queued
        self._qbytes = collections.Counter()  # device -> payload bytes queued
        self._rr = collections.deque()  # devices with something queued, in turn order
        self._refusals = []  # (device, reason, size, mid or None, gen), until the next commit
        self._gen = 0  # connection generation: a mid is PUBACKed only on its own connection
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._idle = threading.Condition()
        self._idle_now = False
        self._error = None
        self.ingest = None
        self._worker = threading.Thread(target=self._run, name="serene-ingest-%d" % worker_id,
                                        daemon=True)
        self.client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                              clean_session=False, protocol=mqtt.MQTTv311, manual_ack=True)
        self.client.username_pw_set(username, password)
        # Acks to the modules go out at QoS 1: paho's default of 20 in flight would make a
        # burst of acks wait for the broker's PUBACKs in paho's memory.
        self.client.max_inflight_messages_set(1000)
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    @property
    def dropped(self):
        """Uplinks refused at intake (all reasons); each is a counted reject in the ledger."""
        return sum(self.refused.values())

    def start(self, timeout=10.0):
        self._worker.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError("ingest did not start: %s" % self._error)
        if not self.subscribed.wait(timeout):
            self.stop()
            raise RuntimeError("no subscription to %s on %s:%d within %.0f s"
                               % (UP_FILTER, self.host, self.port, timeout))
        return self

    def stop(self, timeout=10.0):
        """Finish the batch in hand (committed, acked), then disconnect. What is still queued
        was never PUBACKed: the broker keeps it for the next start."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout)

    def wait_idle(self, timeout=10.0):
        """Block until everything received is processed, committed and acknowledged, and the
        socket had nothing more to read (tests, the bench). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self._idle_now = False
            while not self._idle_now:
                left = deadline - time.monotonic()
                if left <= 0 or not self._worker.is_alive():
                    return False
                self._idle.wait(min(left, 0.1))
            return True

    # --- callbacks (called by paho inside the worker's own loop) -----------------------

    def _on_connect(self, client, userdata, flags, reason, props):
        if reason.is_failure:
            log.error("broker refused the server (%s): %s", self.client_id, reason)
            return
        self.connected.set()
        if not flags.session_present:
            log.info("%s: new session at the broker", self.client_id)
        client.subscribe(UP_FILTER, qos=1)

    def _on_disconnect(self, client, userdata, flags, reason, props):
        self.connected.clear()
        self.subscribed.clear()
        self._gen += 1
        # Nothing queued was PUBACKed: the persistent session delivers it all again.
        self._queues.clear()
        self._qbytes.clear()
        self._rr.clear()
        self.queued_bytes = 0
        if not self._stop.is_set():
            self.disconnects += 1
            log.warning("%s disconnected from the broker (%s); reconnecting", self.client_id,
                        reason)

    def _on_message(self, client, userdata, msg):
        self.received += 1
        payload = msg.payload
        size = len(payload)
        dev = device_from_topic(msg.topic) or "?"
        if msg.qos == 0:
            self._refuse(dev, "qos 0", size, None)
            return
        if self._qbytes[dev] + size > self.device_quota:
            self._refuse(dev, "queue full", size, msg.mid)
            return
        if self.queued_bytes + size > self.memory_bound:
            self._refuse(dev, "server busy", size, msg.mid)
            return
        q = self._queues.get(dev)
        if q is None:
            q = self._queues[dev] = collections.deque()
        if not q:
            self._rr.append(dev)
        q.append(_Queued(msg.topic, payload, msg.mid, self._gen, time.monotonic()))
        self._qbytes[dev] += size
        self.queued_bytes += size
        if self.queued_bytes > self.queued_bytes_peak:
            self.queued_bytes_peak = self.queued_bytes

    def _refuse(self, dev, reason, size, mid):
        self.refused[reason] += 1
        self._refusals.append((dev, reason, size, mid, self._gen))

    # --- the worker's loop ---------------------------------------------------------------

    def _run(self):
        try:
            self.ingest = self.make_ingest()
        except Exception as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        delay, next_connect = RECONNECT_MIN_S, 0.0
        first = True
        try:
            while not self._stop.is_set():
                if self.client._sock is None:
                    if time.monotonic() < next_connect:
                        self._stop.wait(min(IDLE_S * 10, next_connect - time.monotonic()))
                        continue
                    try:
                        if first:
                            self.client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
                            first = False
                        else:
                            self.client.reconnect()
                        self.client.socket().setblocking(False)
                        delay = RECONNECT_MIN_S
                    except (OSError, ValueError) as e:
                        log.warning("%s: cannot reach the broker on %s:%d: %s", self.client_id,
                                    self.host, self.port, e)
                        next_connect = time.monotonic() + delay
                        delay = min(delay * 2, RECONNECT_MAX_S)
                        continue
                self._turn()
            self._finish_batch([], [])  # what was refused meanwhile: counted, PUBACKed
        except Exception:  # noqa: BLE001 - logged; the thread must not die silently
            log.exception("%s: the ingest loop failed", self.client_id)
            self._error = "the ingest loop failed (see the log)"
        finally:
            try:
                self.client.disconnect()
                self._write(1.0)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.client._sock_close()
            self.connected.clear()
            self.subscribed.clear()
            try:
                self.ingest.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the ingest")
            with self._idle:
                self._idle.notify_all()

    def _turn(self):
        """One loop turn: read, process one batch round robin, commit, publish, PUBACK."""
        c = self.client
        if not self._rr and not self._refusals:
            self._wait_network(IDLE_S)
        self._read()
        if c._sock is None:
            return
        c.loop_misc()  # keepalive
        acks, mids, done = [], [], []
        t0 = time.monotonic()
        n, light = 0, False
        while self._rr and n < self.batch_max:
            age = time.monotonic() - t0
            if age >= self.batch_s or (light and age >= BATCH_MIN_S):
                break
            dev = self._rr.popleft()
            q = self._queues[dev]
            item = q.popleft()
            size = len(item.payload)
            self._qbytes[dev] -= size
            self.queued_bytes -= size
            if q:
                self._rr.append(dev)  # its next frame waits for everyone else's turn
            else:
                del self._queues[dev]
                del self._qbytes[dev]
                light = True
            acks += self.ingest.process(item.topic, item.payload)
            self.processed += 1
            mids.append((item.mid, item.gen))
            done.append((dev, item.t))
            n += 1
            self._read()  # keep the socket drained between frames: the broker's window moves
        if self._finish_batch(acks, mids):
            now = time.monotonic()
            for dev, t in done:
                self.latency[dev].append(now - t)
        if not self._rr and not self._refusals and not c.want_write():
            with self._idle:
                if not self._readable(0):
                    self._idle_now = True
                    self._idle.notify_all()

    def _finish_batch(self, acks, mids):
        refusals, self._refusals = self._refusals, []
        for dev, reason, size, mid, gen in refusals:
            self.ingest.refuse(dev, reason, size)
            if mid is not None:
                mids.append((mid, gen))
        try:
            due = self.ingest.due_acks()
        except Exception:  # noqa: BLE001 - never fatal; they come again at the next tick
            log.exception("due_acks")
            due = []
        if not (acks or mids or due):
            return False
        try:
            self.ingest.commit()
        except Exception:  # noqa: BLE001 - the database failed: acknowledge nothing
            self.commit_failures += 1
            log.exception("%s: commit failed; the batch is not acknowledged", self.client_id)
            try:
                self.ingest.store.rollback()
            except Exception:  # noqa: BLE001
                pass
            # The broker resends un-PUBACKed uplinks only on a new connection: make one.
            self.client._sock_close()
            self._on_disconnect(self.client, None, None, "commit failed", None)
            return False
        self.batches += 1
        for topic, ack in acks + list(due):
            self.client.publish(topic, ack, qos=1)
            self.acks_sent += 1
        gen = self._gen
        for mid, g in mids:
            if g == gen:
                self.client.ack(mid, 1)
        self._write(0)
        return True

    def latency_p95(self):
        """{device: p95 of (received -> committed, acked) in ms} over the last LATENCY_KEEP."""
        out = {}
        for dev, xs in list(self.latency.items()):
            xs = sorted(xs)
            if xs:
                out[dev] = round(1000 * xs[min(len(xs) - 1, int(0.95 * len(xs)))], 2)
        return out

    # --- network -------------------------------------------------------------------------

    def _readable(self, timeout):
        c = self.client
        sock = c._sock
        if sock is None:
            return False
        if c.buffered():
            return True
        try:
            r, _, _ = select.select([sock], [], [], timeout)
        except (OSError, ValueError):
            return True  # let the read notice and report the broken connection
        return bool(r)

    def _wait_network(self, timeout):
        c = self.client
        sock = c._sock
        if sock is None or c.buffered():
            return
        try:
            select.select([sock], [sock] if c.want_write() else [], [], timeout)
        except (OSError, ValueError):
            pass

    def _read(self):
        c = self.client
        for _ in range(READ_BURST):
            if c._sock is None or not self._readable(0):
                break
            if c.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
        if c.want_write():
            self._write(0)

    def _write(self, timeout):
        """Write what paho holds; wait up to `timeout` s for the socket to take it all."""
        c = self.client
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
