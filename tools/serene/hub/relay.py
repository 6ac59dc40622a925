"""The hub's relay: modules' GATT service <-> the broker, under the hub's own account.

    hub = Hub(backend, mqtt={"host", "port", "username", "password"}, modules=["SRN-0001"])
    await hub.run()                 # until cancelled; hub.stats counts everything

- Finds its modules by advertised complete local name and service UUID
  (serene.ble.gatt.SERVICE), connects, discovers the service, enables indications on the
  uplink, waits for the link's encryption (a write needing it answers ATT 0x0F until the
  module's pairing is done), then announces itself with a zero-length downlink write
  (docs/ble.md: the module cannot see a CCCD write).
- Each indication is published, QoS 1, on serene/<id>/up; each message on serene/<id>/down is
  written to that module's downlink. The hub never parses what it relays: sealed bytes.
- The hub's internet down (the broker unreachable): uplinks wait in a bounded buffer
  (``buffer_max``; the oldest go first, counted) and go out on reconnection. Downlinks for a
  module not connected are dropped and counted: the module retransmits what stays unacked and
  the server acks it again, so nothing depends on the hub (order-insensitive, lossless by the
  module's acks).
- ``hostile`` (tests): {"drop", "dup", "reorder", "alter"} probabilities and "delay_ms",
  applied to both directions: a hub that misbehaves in every way a relay can.

MQTT is paho (its network thread); its callbacks hand over to the asyncio loop.
"""

import asyncio
import collections
import random

import paho.mqtt.client as mqtt

from ..ble import gatt
from .backends import BackendError

SCAN_PERIOD_S = 0.5  # a module re-advertises at once after a disconnection (100 ms interval)
#: The module's pairing request arrives a few connection events after the connection; the
#: downlink refuses writes (0x0F) until it is done. 10 s matches the module's pairing timeout.
READY_TIMEOUT_S = 10.0
READY_RETRY_S = 0.05
BUFFER_MAX = 10000


class Hub:
    def __init__(self, backend, mqtt, modules, buffer_max=BUFFER_MAX, hostile=None, seed=0):
        self.backend = backend
        self.mqtt_cfg = mqtt
        self.modules = list(modules)
        self.buffer = collections.deque()
        self.buffer_max = buffer_max
        self.hostile = hostile or {}
        self.rng = random.Random(seed)
        self.links = {}  # module id -> {"conn", "up", "down", "status"}
        self._by_conn = {}
        self._mq = None
        self._mq_up = asyncio.Event()
        self._loop = None
        self._held = []  # hostile reordering: frames held back
        self._tasks = set()
        self.stats = collections.Counter()

    # --- MQTT ---------------------------------------------------------------------------

    def _mqtt_start(self):
        c = self.mqtt_cfg
        cl = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=c["username"],
                         clean_session=False)
        cl.username_pw_set(c["username"], c["password"])
        cl.reconnect_delay_set(0.2, 2)
        cl.on_connect = self._on_connect
        cl.on_disconnect = self._on_disconnect
        cl.on_message = self._on_message
        cl.connect_async(c.get("host", "127.0.0.1"), c["port"], keepalive=10)
        cl.loop_start()
        self._mq = cl

    def _on_connect(self, client, _ud, _flags, reason, _props):
        if reason.is_failure:
            self._loop.call_soon_threadsafe(self.stats.update, ["mqtt_refused"])
            return
        for dev in self.modules:
            client.subscribe("serene/%s/down" % dev, qos=1)
        self._loop.call_soon_threadsafe(self._mq_up.set)

    def _on_disconnect(self, _client, _ud, _flags, _reason, _props):
        self._loop.call_soon_threadsafe(self._mq_up.clear)

    def _on_message(self, _client, _ud, msg):
        parts = msg.topic.split("/")
        if len(parts) == 3 and parts[2] == "down":
            self._loop.call_soon_threadsafe(self._spawn, self._downlink(parts[1], msg.payload))

    def _spawn(self, coro):
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _publish_ok(self, dev, data):
        if not self._mq_up.is_set():
            return False
        info = self._mq.publish("serene/%s/up" % dev, bytes(data), qos=1)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    # --- relaying -----------------------------------------------------------------------

    def _hostile(self, items):
        """What a hostile hub makes of one frame: [] (dropped), one, or several (duplicated,
        altered); reordering holds a frame back until the next one."""
        h = self.hostile
        if not h:
            return items
        out = []
        for d in items:
            if self.rng.random() < h.get("drop", 0):
                self.stats["hostile_dropped"] += 1
                continue
            if self.rng.random() < h.get("alter", 0):
                b = bytearray(d)
                b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
                out.append(bytes(b))
                self.stats["hostile_altered"] += 1
            if self.rng.random() < h.get("dup", 0):
                out.append(d)
                self.stats["hostile_duplicated"] += 1
            if self.rng.random() < h.get("reorder", 0):
                self._held.append(d)
                self.stats["hostile_reordered"] += 1
                continue
            out.append(d)
        if self._held and out:
            out = out + self._held
            self._held = []
        return out

    async def _delay(self):
        ms = self.hostile.get("delay_ms", 0)
        if ms:
            await asyncio.sleep(self.rng.uniform(0, ms) / 1000.0)

    async def _uplink(self, dev, data):
        self.stats["uplinks"] += 1
        for d in self._hostile([data]):
            await self._delay()
            self.buffer.append((dev, d))
            if len(self.buffer) > self.buffer_max:
                self.buffer.popleft()
                self.stats["buffer_dropped"] += 1
        self._flush()

    def _flush(self):
        while self.buffer:
            dev, d = self.buffer[0]
            if not self._publish_ok(dev, d):
                self.stats["buffered"] = len(self.buffer)
                return
            self.buffer.popleft()
            self.stats["published"] += 1
        self.stats["buffered"] = 0

    async def _downlink(self, dev, data):
        self.stats["downlinks"] += 1
        for d in self._hostile([bytes(data)]):
            await self._delay()
            link = self.links.get(dev)
            if link is None or not link.get("ready"):
                self.stats["downlinks_undeliverable"] += 1
                continue
            try:
                st = await self.backend.write(link["conn"], link["down"], d)
            except BackendError:
                st = -1
            self.stats["downlinks_written" if st == 0 else "downlinks_refused"] += 1

    # --- modules ------------------------------------------------------------------------

    async def _attach(self, ad):
        dev = ad["name"]
        try:
            conn = await self.backend.connect(ad["addr"])
        except BackendError:
            self.stats["connect_failures"] += 1
            return
        link = {"conn": conn, "ready": False}
        self.links[dev] = link
        self._by_conn[conn] = dev
        try:
            d = await self.backend.discover(conn)
            by = {c["uuid"]: c["handle"] for c in d["chars"]}
            link["up"] = by[str(gatt.UPLINK)]
            link["down"] = by[str(gatt.DOWNLINK)]
            link["status"] = by[str(gatt.STATUS)]
            if await self.backend.subscribe(conn, link["up"]) != 0:
                raise BackendError("subscribe", "refused")
            loop = asyncio.get_running_loop()
            end = loop.time() + READY_TIMEOUT_S
            while True:
                st = await self.backend.write(conn, link["down"], b"")
                if st == 0:
                    break
                if st != gatt.ATT_INSUFFICIENT_ENCRYPTION or loop.time() > end:
                    raise BackendError("ready", "ATT status %r" % st)
                await asyncio.sleep(READY_RETRY_S)
            if conn in self._by_conn:
                link["ready"] = True
                self.stats["connections"] += 1
        except (BackendError, KeyError):
            self.stats["setup_failures"] += 1
            await self.backend.disconnect(conn)
            self._gone(conn)

    def _gone(self, conn):
        dev = self._by_conn.pop(conn, None)
        if dev is not None and self.links.get(dev, {}).get("conn") == conn:
            del self.links[dev]
            self.stats["disconnects"] += 1

    async def _events(self):
        while True:
            ev = await self.backend.events.get()
            if ev["ev"] == "indication":
                dev = self._by_conn.get(ev["conn"])
                if dev is None:
                    self.stats["indications_unknown"] += 1
                    continue
                self._spawn(self._uplink(dev, ev["data"]))
            elif ev["ev"] == "disconnected":
                self._gone(ev["conn"])

    async def _scanner(self):
        while True:
            try:
                ads = await self.backend.scan()
            except BackendError:
                ads = []
                self.stats["scan_failures"] += 1
            for ad in ads:
                if (ad["name"] in self.modules and gatt.SERVICE in ad["services"]
                        and ad["name"] not in self.links):
                    await self._attach(ad)
            await asyncio.sleep(SCAN_PERIOD_S)

    async def _flusher(self):
        while True:
            await self._mq_up.wait()
            self._flush()
            await asyncio.sleep(0.05)

    async def run(self):
        self._loop = asyncio.get_running_loop()
        await self.backend.open()
        self._mqtt_start()
        tasks = [asyncio.ensure_future(c) for c in (self._events(), self._scanner(),
                                                    self._flusher())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks + list(self._tasks):
                t.cancel()
            self._mq.loop_stop()
            self._mq.disconnect()
            await self.backend.close()
