"""The LoRaWAN ingest: ChirpStack v4's MQTT integration in, sealed acks out as downlinks.

    cs = ChirpstackIntake(make_ingest, server_port, username, password, dev_euis,
                          worker_id=1, downlinks_per_day=10).start()
    cs.wait_idle(10)       # tests, the bench: everything received is committed
    cs.stop()

A LoRaWAN network server (ChirpStack v4, or the stand-in serene.netserver that publishes the
same JSON) hands each uplink to the application on
``application/{applicationId}/device/{devEui}/event/up`` ({"deviceInfo": {"devEui",
"applicationId", ...}, "fPort", "fCnt", "dr", "data" (base64), ...}) and takes downlinks on
``application/{applicationId}/device/{devEui}/command/down`` ({"devEui", "confirmed",
"fPort", "data"}). This intake is a client of its own on the broker's server listener (its own
client id, serene-chirpstack-<worker id>, persistent session, manual PUBACK) with an Ingest of
its own (its own worker id, sharing the database with the LTE-M intake):

- devEui -> module: the registry's devices[id]["dev_eui"] (written by serene provision); an
  uplink of a devEui not in it, of an FPort other than 10, without data or not JSON is refused
  and counted (ingest.refuse: "lorawan unknown devEui", "lorawan fport", "lorawan bad event").
- The ``data`` of FPort 10 is the link frame: ingest.process("serene/<id>/up", frame), exactly
  as an LTE-M uplink (the device is named by the devEui, which the network server
  authenticated by the frame's MIC under the device's session keys).
- Nothing is lost: an event is PUBACKed only after the commit that made its effect durable (a
  refused one after the commit of its count); a failed commit PUBACKs nothing and reconnects
  (the persistent session delivers everything again).
- Downlink budget (class A: a downlink costs the gateway airtime and rides on an uplink; public
  networks allow about 10 a day per device, confirmed-uplink acks included): the acks that
  ingest seals are COALESCED per (device, epoch), the latest cumulative ack wins (an older one
  says nothing more). One is sent only when the module asks for it (link frame flag
  ACK_REQUESTED) or when ``ack_after`` entries arrived since the last ack sent, and never more
  than ``downlinks_per_day`` per device in any sliding 24 h (persisted in budget_path, so a
  restart does not reset it). An ack the budget refuses stays pending (counted
  "over_budget"); the module's retransmission asks again.
"""

import base64
import binascii
import collections
import json
import logging
import os
import pathlib
import queue
import threading
import time

import paho.mqtt.client as mqtt

from .. import linkframe
from ..linkframe import LinkFrameError

log = logging.getLogger("serene.server.chirpstack")

UP_FILTER = "application/+/device/+/event/up"
DOWN_TOPIC = "application/%s/device/%s/command/down"
FPORT = 10
#: Public LoRaWAN networks' fair use: about 10 downlinks per device per day.
DOWNLINKS_PER_DAY = 10
#: An ack without being asked once this many entries arrived since the last one sent (a
#: module that cannot ask, e.g. its asking frame was lost, still gets one).
ACK_AFTER = 32
DAY_S = 86400.0
BATCH_MAX = 64
IDLE_S = 0.010
KEEPALIVE_S = 30


def load_dev_euis(home):
    """{devEui (lower hex): device id} from registry.json devices[id]["dev_eui"]."""
    reg = json.loads((pathlib.Path(home) / "registry.json").read_text())
    out = {}
    for dev, entry in reg.get("devices", {}).items():
        eui = entry.get("dev_eui")
        if eui:
            out[eui.lower()] = dev
    return out


def ack_epoch(ack):
    """The kid (epoch, 4 bytes BE) of a sealed ack (docs/wire-format.md §3.3: flags, partial
    IV of flags & 7 bytes, kid); None if it has none."""
    if len(ack) < 6 or not ack[0] & 0x08:
        return None
    n = ack[0] & 0x07
    return int.from_bytes(ack[1 + n:5 + n], "big")


class _Budget:
    """Downlinks sent per device in the last 24 h, persisted (JSON, atomic replace)."""

    def __init__(self, path, per_day, clock):
        self.path = pathlib.Path(path) if path else None
        self.per_day = per_day
        self.clock = clock
        self.sent = collections.defaultdict(list)  # device -> [time sent]
        self._full_until = 0.0
        if self.path and self.path.exists():
            try:
                for dev, ts in json.loads(self.path.read_text()).get("sent", {}).items():
                    self.sent[dev] = [float(t) for t in ts]
            except (ValueError, AttributeError, TypeError):
                # Not knowing what was spent, spend nothing for a day (never over the cap).
                log.error("%s unreadable: no downlink for 24 h", self.path)
                self.sent = collections.defaultdict(list)
                self._full_until = clock() + DAY_S
        self._dirty = False

    def _trim(self, dev, now):
        ts = self.sent[dev]
        while ts and ts[0] <= now - DAY_S:
            ts.pop(0)
        return ts

    def left(self, dev, now=None):
        now = self.clock() if now is None else now
        if now < self._full_until:
            return 0
        return self.per_day - len(self._trim(dev, now))

    def spend(self, dev, now=None):
        now = self.clock() if now is None else now
        self._trim(dev, now).append(now)
        self._dirty = True

    def save(self):
        if not (self.path and self._dirty):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"sent": {d: ts for d, ts in self.sent.items() if ts}}, f)
        os.replace(tmp, self.path)
        self._dirty = False


class _Dev:
    __slots__ = ("app_id", "dev_eui", "acks", "wanted", "entries")

    def __init__(self, app_id, dev_eui):
        self.app_id, self.dev_eui = app_id, dev_eui
        self.acks = {}  # epoch -> latest sealed ack not sent yet
        self.wanted = False  # the module asked for an ack not sent yet
        self.entries = 0  # link entries received since the last ack sent


class ChirpstackIntake:
    def __init__(self, make_ingest, port, username, password, dev_euis, host="127.0.0.1",
                 worker_id=1, client_id=None, downlinks_per_day=DOWNLINKS_PER_DAY,
                 ack_after=ACK_AFTER, budget_path=None, fport=FPORT, clock=time.time):
        """make_ingest: called in the worker thread (the SQLite connection is the thread's).
        port: the broker's server listener. dev_euis: {devEui: device id} (load_dev_euis)."""
        self.make_ingest = make_ingest
        self.host, self.port = host, port
        self.worker_id = worker_id
        self.client_id = client_id or "serene-chirpstack-%d" % worker_id
        self.dev_euis = {k.lower(): v for k, v in dev_euis.items()}
        self.ack_after = ack_after
        self.fport = fport
        self.clock = clock
        self.budget = _Budget(budget_path, downlinks_per_day, clock)
        self.stats = collections.Counter()  # received, processed, downlinks, over_budget, ...
        self.refused = collections.Counter()
        self.downlinks = collections.Counter()  # device -> downlinks sent by this process
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.ingest = None
        self._q = queue.Queue()
        self._devs = {}  # device id -> _Dev
        self._gen = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error = None
        self._idle = threading.Event()
        self._worker = threading.Thread(target=self._run, name="serene-chirpstack-%d"
                                        % worker_id, daemon=True)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  clean_session=False, protocol=mqtt.MQTTv311, manual_ack=True)
        self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    # --- life cycle ----------------------------------------------------------------------

    def start(self, timeout=10.0):
        self._worker.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError("chirpstack intake did not start: %s" % self._error)
        self.client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            self.stop()
            raise RuntimeError("no subscription to %s on %s:%d" % (UP_FILTER, self.host,
                                                                   self.port))
        return self

    def stop(self, timeout=10.0):
        """Finish what was received (committed, PUBACKed), then disconnect."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    def wait_idle(self, timeout=10.0):
        """True once everything received is committed, its acks handled (tests, bench)."""
        deadline = time.monotonic() + timeout
        self._idle.clear()
        while time.monotonic() < deadline:
            if self._idle.wait(0.05) and self._q.empty():
                return True
        return False

    def used(self, device):
        """Downlinks spent on `device` in the last 24 h (persisted budget)."""
        return self.budget.per_day - self.budget.left(device)

    # --- paho's thread ---------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason, props):
        if reason.is_failure:
            log.error("broker refused %s: %s", self.client_id, reason)
            return
        self._gen += 1
        self.connected.set()
        client.subscribe(UP_FILTER, qos=1)

    def _on_disconnect(self, client, userdata, flags, reason, props):
        self.connected.clear()
        self._gen += 1  # what was received and not PUBACKed comes again

    def _on_message(self, client, userdata, msg):
        self._q.put((msg.topic, msg.payload, msg.mid, msg.qos, self._gen))

    # --- the worker ----------------------------------------------------------------------

    def _run(self):
        try:
            self.ingest = self.make_ingest()
        except Exception as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not (self._stop.is_set() and self._q.empty()):
                self._turn()
        except Exception:  # noqa: BLE001 - logged; the thread must not die silently
            log.exception("%s: the intake loop failed", self.client_id)
            self._error = "the intake loop failed"
        finally:
            try:
                self.ingest.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the ingest")

    def _turn(self):
        batch = []
        try:
            batch.append(self._q.get(timeout=IDLE_S))
            while len(batch) < BATCH_MAX:
                batch.append(self._q.get_nowait())
        except queue.Empty:
            pass
        ing = self.ingest
        mids = []
        for topic, payload, mid, qos, gen in batch:
            self.stats["received"] += 1
            self._event(topic, payload, qos)
            if qos:
                mids.append((mid, qos, gen))
        try:
            due = ing.due_acks()
        except Exception:  # noqa: BLE001 - they come again at the next tick
            log.exception("due_acks")
            due = []
        for topic, ack in due:
            self._take_ack(linkframe_device(topic), ack)
        if not (batch or due):
            self._idle.set()
            return
        try:
            ing.commit()
        except Exception:  # noqa: BLE001 - the database failed: acknowledge nothing
            self.stats["commit_failures"] += 1
            log.exception("%s: commit failed; nothing PUBACKed", self.client_id)
            try:
                ing.rollback()
            except Exception:  # noqa: BLE001
                pass
            for d in self._devs.values():
                d.acks.clear()  # sealed in the rolled-back batch: never sent
            try:
                self.client.reconnect()  # the broker delivers the un-PUBACKed events again
            except OSError:
                pass
            return
        self._send_acks()
        for mid, qos, gen in mids:
            if gen == self._gen:
                self.client.ack(mid, qos)
        if self._q.empty():
            self._idle.set()

    def _refuse(self, dev, reason, size):
        self.refused[reason] += 1
        self.ingest.refuse(dev or "?", reason, size)

    def _event(self, topic, payload, qos):
        size = len(payload)
        parts = topic.split("/")
        eui = parts[3].lower() if len(parts) == 6 else ""
        dev = self.dev_euis.get(eui)
        if dev is None:
            self._refuse("?", "lorawan unknown devEui", size)
            return
        if not qos:
            self._refuse(dev, "qos 0", size)
            return
        try:
            ev = json.loads(payload)
            info = ev.get("deviceInfo") or {}
            if str(info.get("devEui", eui)).lower() != eui:
                raise ValueError("devEui of the topic and of deviceInfo differ")
            port = ev.get("fPort")
            data = base64.b64decode(ev.get("data") or "", validate=True)
        except (ValueError, TypeError, AttributeError, binascii.Error):
            self._refuse(dev, "lorawan bad event", size)
            return
        if port != self.fport or not data:
            self._refuse(dev, "lorawan fport", size)
            return
        d = self._devs.get(dev)
        if d is None:
            d = self._devs[dev] = _Dev(info.get("applicationId") or parts[1], eui)
        d.app_id = info.get("applicationId") or parts[1]
        acks = self.ingest.process("serene/%s/up" % dev, data)
        self.stats["processed"] += 1
        try:
            frame = linkframe.parse(data)
            d.entries += len(frame.entries)
            if frame.flags & linkframe.ACK_REQUESTED:
                d.wanted = True
                self.stats["ack_requests"] += 1
        except LinkFrameError:
            pass  # refused and counted by ingest.process
        for _topic, ack in acks:
            self._take_ack(dev, ack)

    def _take_ack(self, dev, ack):
        d = self._devs.get(dev)
        if d is None or dev is None:
            return
        e = ack_epoch(ack)
        if e in d.acks:
            self.stats["coalesced"] += 1
        d.acks[e] = ack  # the latest cumulative ack of that epoch wins

    def _send_acks(self):
        now = self.clock()
        for dev, d in self._devs.items():
            if not d.acks or not (d.wanted or d.entries >= self.ack_after):
                continue
            for e in sorted(d.acks, key=lambda x: -1 if x is None else x):
                if self.budget.left(dev, now) <= 0:
                    self.stats["over_budget"] += 1
                    break
                ack = d.acks.pop(e)
                body = {"devEui": d.dev_eui, "confirmed": False, "fPort": self.fport,
                        "data": base64.b64encode(ack).decode()}
                self.client.publish(DOWN_TOPIC % (d.app_id, d.dev_eui), json.dumps(body), qos=1)
                self.budget.spend(dev, now)
                self.downlinks[dev] += 1
                self.stats["downlinks"] += 1
                d.wanted = False
                d.entries = 0
        self.budget.save()


def linkframe_device(topic):
    """The device of an ingest ack topic serene/<id>/down."""
    parts = topic.split("/")
    return parts[1] if len(parts) == 3 else None
