"""The simulated BLE medium: modules (through drivers/unix/aioble_sim.py) and hubs meet here.

One TCP listener on loopback. A connection whose first byte is ``{`` is a hub speaking JSON
lines; any other is a module's aioble shim speaking length-prefixed binary messages:

    u16 BE length (of what follows), u8 type, body (integers big-endian)
    module -> medium  G  register: service uuid 16, then per characteristic handle u16,
                         flags u32, uuid 16
                      A  advertise: interval_us u32, connectable u8, adv len u8, adv, resp
                      a  stop advertising
                      V  local value: handle u16, data (gatts_write; what hubs read)
                      I  indicate: conn u16, handle u16, data
                      M  exchange MTU: conn u16, mtu u16 (the module's ATT_MTU)
                      P  pair: conn u16, bond u8, le_secure u8, mitm u8, io u8
                      D  disconnect: conn u16
    medium -> module  C  connected: conn u16, addr type u8, addr 6
                      X  disconnected: conn u16, reason u8 (HCI codes: 0x08 supervision
                         timeout, 0x13 remote user terminated, 0x16 local host terminated)
                      W  write: conn u16, handle u16, data
                      K  indication confirmed: conn u16, handle u16, status u8
                      U  MTU exchanged: conn u16, mtu u16
                      E  encryption: conn u16, encrypted u8, authenticated u8, bonded u8,
                         key size u8

Hub requests are JSON objects with "op" (and "id", echoed in the answer): scan, connect,
discover, subscribe, mtu, pair, read, write, confirm, disconnect, range, stats. Events to a
hub: {"ev": "indication", "conn", "handle", "data" (hex)}, {"ev": "disconnected", "conn",
"reason"}. serene.ble.client wraps them.

Timing (docs/ble.md): connection interval ``conn_interval_ms`` (30), ``pkts_per_event`` LL
packets per connection event (4), LL payload ``ll_payload`` (27 bytes: no Data Length
Extension; 251 with it). An indication reaches the hub after the events its fragments need,
and its confirmation reaches the module one event later (serene.ble.gatt.indication_events);
one direction carries one PDU at a time, so throughput is bounded the same way. A hub's
write reaches the module after its events, its response one event later.

Range: ``scenario["modules"][name]["out_of_range"] = [[start_s, end_s], ...]`` on the
medium's clock (seconds since start(), or since the first connection with
``"t0": "first_connection"``; scaled by ``clock_scale``), or the hub op "range".
Out of range, a module's adverts are not seen and connections fail; a connection whose
module leaves range ends after ``supervision_timeout_ms`` (Core Vol 6 Part B §4.5.2) on both
sides with reason 0x08, its unconfirmed indication lost.

ATT confirmations are the hub's stack's, automatic; a hub may connect with
{"confirm": "manual"} (a hostile or broken hub) and confirm, late or never, itself.
Everything is counted in ``stats``.
"""

import asyncio
import json
import struct
import threading
import time
import uuid

from . import gatt

DEFAULTS = {
    "conn_interval_ms": 30,
    "pkts_per_event": 4,
    "ll_payload": 27,
    "supervision_timeout_ms": 1000,
    "hub_max_mtu": gatt.MAX_ATT_MTU,
    "pairing": "sc",  # "sc": LE Secure Connections; "legacy"; "none": the hub refuses
    "clock_scale": 1.0,
    "t0": "start",  # or "first_connection": the schedule's clock starts there
    "modules": {},
}
# HCI error codes (Core v5.4 Vol 1 Part F §1.3) used as disconnection reasons.
R_TIMEOUT = 0x08
R_REMOTE = 0x13
R_LOCAL = 0x16
_RANGE_TICK_S = 0.02


class ScenarioError(ValueError):
    """A scenario that cannot be used. `key`: where; the message says why."""

    def __init__(self, key, msg):
        super().__init__("scenario %s: %s" % (key, msg))
        self.key = key


def check_scenario(sc):
    """Validate a scenario (declarative data, never code: a JSON file or a dict) and return it
    completed with the defaults."""
    if not isinstance(sc, dict):
        raise ScenarioError("", "not an object")
    for k in sc:
        if k not in DEFAULTS:
            raise ScenarioError(k, "unknown key")
    out = dict(DEFAULTS)
    out.update(sc)
    for k in ("conn_interval_ms", "pkts_per_event", "ll_payload", "supervision_timeout_ms",
              "hub_max_mtu", "clock_scale"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ScenarioError(k, "must be a positive number")
    # Core Vol 6 Part B §4.5.1: 7.5 ms..4 s; LL payload 27..251 (§2.4); ATT_MTU 23..517.
    if not 7.5 <= out["conn_interval_ms"] <= 4000:
        raise ScenarioError("conn_interval_ms", "outside 7.5..4000")
    if not 27 <= out["ll_payload"] <= 251:
        raise ScenarioError("ll_payload", "outside 27..251")
    if not gatt.DEFAULT_ATT_MTU <= out["hub_max_mtu"] <= 517:
        raise ScenarioError("hub_max_mtu", "outside 23..517")
    if out["pairing"] not in ("sc", "legacy", "none"):
        raise ScenarioError("pairing", "sc, legacy or none")
    if out["t0"] not in ("start", "first_connection"):
        raise ScenarioError("t0", "start or first_connection")
    if not isinstance(out["modules"], dict):
        raise ScenarioError("modules", "not an object")
    for name, spec in out["modules"].items():
        if not isinstance(spec, dict) or set(spec) - {"out_of_range"}:
            raise ScenarioError("modules.%s" % name, "only out_of_range")
        for iv in spec.get("out_of_range", ()):
            if (not isinstance(iv, (list, tuple)) or len(iv) != 2
                    or not all(isinstance(x, (int, float)) for x in iv) or not iv[0] < iv[1]):
                raise ScenarioError("modules.%s.out_of_range" % name, "[start_s, end_s] pairs")
    return out


def load_scenario(path):
    """A scenario from a JSON file, validated (check_scenario)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ScenarioError(str(path), "not JSON: %s" % e) from None
    return check_scenario(data)


def _pack(t, body=b""):
    return struct.pack(">HB", len(body) + 1, t) + body


class _Module:
    def __init__(self, medium, writer, n):
        self.medium = medium
        self.writer = writer
        self.addr = bytes([0xC0, 0, 0, 0, (n >> 8) & 0xFF, n & 0xFF])
        self.name = None
        self.service = None
        self.chars = {}  # handle -> {"uuid", "flags", "value"}
        self.adv = None  # (adv_data, resp_data) while advertising
        self.conn = None
        self.out_since = None  # medium time when it left range (while connected)

    def send(self, t, body=b""):
        if not self.writer.is_closing():
            self.writer.write(_pack(t, body))


class _Hub:
    def __init__(self, writer):
        self.writer = writer
        self.conns = set()

    def send(self, obj):
        if not self.writer.is_closing():
            self.writer.write((json.dumps(obj) + "\n").encode())


class _Conn:
    def __init__(self, cid, module, hub, manual_confirm):
        self.cid = cid
        self.module = module
        self.hub = hub
        self.mtu = gatt.DEFAULT_ATT_MTU
        self.encrypted = False
        self.bonded = False
        self.subscribed = set()
        self.manual_confirm = manual_confirm
        self.indication = None  # handle of the indication waiting for its confirmation
        self.up_free = 0.0  # medium time when module -> hub is free again
        self.down_free = 0.0
        self.alive = True


class Medium:
    """The BLE medium. ``with Medium(scenario) as m: m.port`` (a thread runs its loop)."""

    def __init__(self, scenario=None, host="127.0.0.1", port=0):
        self.cfg = check_scenario(scenario or {})
        self.host = host
        self.port = port
        self.stats = {k: 0 for k in (
            "modules", "hubs", "adverts", "scans", "connects", "connects_refused",
            "disconnects", "supervision_timeouts", "mtu_exchanges", "pairings",
            "pairings_refused", "indications", "indications_confirmed", "indications_lost",
            "indications_unsubscribed", "indication_bytes", "writes", "writes_refused",
            "write_bytes", "reads", "reads_refused", "air_us", "malformed")}
        self._modules = []
        self._conns = {}
        self._next_conn = 1
        self._loop = None
        self._thread = None
        self._server = None
        self._t0 = None
        self._ready = threading.Event()
        self._forced = {}  # name -> bool: range forced by the hub op "range"
        self._writers = set()
        self._t0_set = False
        self._tasks = set()

    # --- life cycle ---------------------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._run, name="ble-medium", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("BLE medium did not start")
        return self

    def _run(self):
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())

    async def _serve(self):
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._t0 = time.monotonic()
        self._stop = asyncio.Event()
        tick = asyncio.ensure_future(self._range_task())
        self._ready.set()
        await self._stop.wait()
        tick.cancel()
        self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self):
        if self._loop and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def now(self):
        """Medium seconds since start (scaled)."""
        return (time.monotonic() - self._t0) * self.cfg["clock_scale"]

    def snapshot(self):
        """A copy of the counters, taken on the medium's own thread."""
        fut = asyncio.run_coroutine_threadsafe(self._snap(), self._loop)
        return fut.result(5)

    async def _snap(self):
        return dict(self.stats)

    # --- range --------------------------------------------------------------------------

    def in_range(self, module):
        if module.name in self._forced:
            return self._forced[module.name]
        spec = self.cfg["modules"].get(module.name) or {}
        t = self.now()
        for a, b in spec.get("out_of_range", ()):
            if a <= t < b:
                return False
        return True

    async def _range_task(self):
        while True:
            await asyncio.sleep(_RANGE_TICK_S)
            for m in list(self._modules):
                c = m.conn
                if c is None:
                    continue
                if self.in_range(m):
                    m.out_since = None
                    continue
                if m.out_since is None:
                    m.out_since = time.monotonic()
                elif (time.monotonic() - m.out_since) * 1000 >= self.cfg[
                        "supervision_timeout_ms"]:
                    self.stats["supervision_timeouts"] += 1
                    self._drop(c, R_TIMEOUT, R_TIMEOUT)

    # --- timing -------------------------------------------------------------------------

    def _ci_s(self):
        return self.cfg["conn_interval_ms"] / 1000.0

    def _transfer(self, conn, attr, n):
        """Schedule an n-byte ATT PDU in one direction; return (delivered_at, answered_at) as
        loop times: after its connection events, and one more for the peer's answer."""
        loop = self._loop
        ev = gatt.indication_events(n, self.cfg["ll_payload"], self.cfg["pkts_per_event"])
        start = max(loop.time(), getattr(conn, attr))
        delivered = start + (ev - 1) * self._ci_s()
        answered = delivered + self._ci_s()
        setattr(conn, attr, answered)
        self.stats["air_us"] += gatt.air_us(n, self.cfg["ll_payload"], conn.encrypted)
        return delivered, answered

    # --- connections --------------------------------------------------------------------

    async def _client(self, reader, writer):
        self._writers.add(writer)
        self._tasks.add(asyncio.current_task())
        try:
            await self._client_session(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(asyncio.current_task())

    async def _client_session(self, reader, writer):
        try:
            first = await reader.readexactly(1)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if first == b"{":
            await self._hub_session(first, reader, writer)
        else:
            await self._module_session(first, reader, writer)

    def _drop(self, conn, module_reason, hub_reason):
        if not conn.alive:
            return
        conn.alive = False
        self.stats["disconnects"] += 1
        if conn.indication is not None:
            self.stats["indications_lost"] += 1
        self._conns.pop(conn.cid, None)
        conn.hub.conns.discard(conn.cid)
        if conn.module.conn is conn:
            conn.module.conn = None
        conn.module.out_since = None
        conn.module.send(ord("X"), struct.pack(">HB", conn.cid, module_reason))
        conn.hub.send({"ev": "disconnected", "conn": conn.cid, "reason": hub_reason})

    # --- modules ------------------------------------------------------------------------

    async def _module_session(self, first, reader, writer):
        m = _Module(self, writer, len(self._modules) + 1)
        self._modules.append(m)
        self.stats["modules"] += 1
        buf = first
        try:
            while True:
                hdr = buf + await reader.readexactly(2 - len(buf))
                buf = b""
                (n,) = struct.unpack(">H", hdr)
                msg = await reader.readexactly(n)
                self._module_msg(m, msg[0], msg[1:])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if m.conn is not None:
                self._drop(m.conn, R_LOCAL, R_REMOTE)
            self._modules.remove(m)
            writer.close()

    def _module_msg(self, m, t, b):
        t = chr(t)
        if t == "G":
            m.service = uuid.UUID(bytes=b[:16])
            m.chars = {}
            for i in range(16, len(b) - 21, 22):
                h, flags = struct.unpack_from(">HI", b, i)
                m.chars[h] = {"uuid": uuid.UUID(bytes=b[i + 6 : i + 22]), "flags": flags,
                              "value": b""}
        elif t == "A":
            _interval, _connectable, n = struct.unpack_from(">IBB", b)
            adv = b[6 : 6 + n]
            resp = b[6 + n :]
            m.adv = (adv, resp)
            m.name = gatt.ad_name(adv, resp)
            self.stats["adverts"] += 1
        elif t == "a":
            m.adv = None
        elif t == "V":
            (h,) = struct.unpack_from(">H", b)
            if h in m.chars:
                m.chars[h]["value"] = b[2:]
        elif t == "I":
            cid, h = struct.unpack_from(">HH", b)
            self._indicate(m, cid, h, b[4:])
        elif t == "M":
            cid, mtu = struct.unpack_from(">HH", b)
            c = self._conns.get(cid)
            if c and c.module is m:
                self._exchange_mtu(c, mtu)
        elif t == "P":
            cid, bond, sc, mitm, _io = struct.unpack_from(">HBBBB", b)
            c = self._conns.get(cid)
            if c and c.module is m:
                self._pair(c, bond, sc, mitm)
        elif t == "D":
            (cid,) = struct.unpack_from(">H", b)
            c = self._conns.get(cid)
            if c and c.module is m:
                self._drop(c, R_LOCAL, R_REMOTE)
        else:
            self.stats["malformed"] += 1

    def _indicate(self, m, cid, h, data):
        c = self._conns.get(cid)
        if c is None or c.module is not m:
            return
        if c.indication is not None or len(data) > c.mtu - 3:
            # What NimBLE refuses (one outstanding; value beyond ATT_MTU - 3): never sent.
            self.stats["malformed"] += 1
            m.send(ord("K"), struct.pack(">HHB", cid, h, gatt.ATT_INVALID_ATTRIBUTE_LENGTH))
            return
        self.stats["indications"] += 1
        self.stats["indication_bytes"] += len(data)
        c.indication = h
        delivered, answered = self._transfer(c, "up_free", len(data))
        loop = self._loop

        def deliver():
            if not c.alive:
                return
            if h in c.subscribed:
                c.hub.send({"ev": "indication", "conn": cid, "handle": h, "data": data.hex()})
            else:
                self.stats["indications_unsubscribed"] += 1
            if not c.manual_confirm:
                loop.call_at(answered, self._confirm, c, h)

        loop.call_at(delivered, deliver)

    def _confirm(self, c, h):
        if not c.alive or c.indication != h:
            return False
        c.indication = None
        self.stats["indications_confirmed"] += 1
        c.module.send(ord("K"), struct.pack(">HHB", c.cid, h, 0))
        return True

    def _exchange_mtu(self, c, mtu):
        c.mtu = max(gatt.DEFAULT_ATT_MTU, min(mtu, c.hub_mtu))
        self.stats["mtu_exchanges"] += 1
        _, answered = self._transfer(c, "down_free", 3)

        def done():
            if c.alive:
                c.module.send(ord("U"), struct.pack(">HH", c.cid, c.mtu))
                c.hub.send({"ev": "mtu", "conn": c.cid, "mtu": c.mtu})

        self._loop.call_at(answered, done)

    def _pair(self, c, bond, sc, mitm):
        mode = self.cfg["pairing"]
        if mode == "none" or (sc and mode != "sc" and mitm):
            self.stats["pairings_refused"] += 1
            return  # no encryption update: the module's pair() times out
        self.stats["pairings"] += 1
        c.encrypted = True
        c.bonded = bool(bond)
        # Just Works (no IO on the module): encrypted, not authenticated (no MITM protection).
        body = struct.pack(">HBBBB", c.cid, 1, 0, 1 if bond else 0, 16)
        _, answered = self._transfer(c, "down_free", 16)
        self._loop.call_at(answered + 3 * self._ci_s(),
                           lambda: c.alive and c.module.send(ord("E"), body))

    # --- hubs ---------------------------------------------------------------------------

    async def _hub_session(self, first, reader, writer):
        hub = _Hub(writer)
        self.stats["hubs"] += 1
        line = first
        try:
            while True:
                line += await reader.readline()
                if not line.endswith(b"\n"):
                    break
                try:
                    req = json.loads(line)
                except ValueError:
                    self.stats["malformed"] += 1
                    req = None
                line = b""
                if isinstance(req, dict):
                    self._hub_req(hub, req)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for cid in list(hub.conns):
                c = self._conns.get(cid)
                if c:
                    self._drop(c, R_REMOTE, R_LOCAL)
            writer.close()

    def _module_by(self, addr):
        for m in self._modules:
            if m.addr.hex() == addr:
                return m
        return None

    def _hub_req(self, hub, req):
        op = req.get("op")
        rid = req.get("id")

        def answer(**kw):
            kw["id"] = rid
            kw.setdefault("ev", op)
            hub.send(kw)

        c = self._conns.get(req.get("conn"))
        if c is not None and c.hub is not hub:
            c = None
        if op == "scan":
            self.stats["scans"] += 1
            seen = [{"addr": m.addr.hex(), "adv": m.adv[0].hex(), "resp": m.adv[1].hex()}
                    for m in self._modules if m.adv is not None and self.in_range(m)]
            answer(adverts=seen)
        elif op == "connect":
            m = self._module_by(req.get("addr"))
            if m is None or m.adv is None or not self.in_range(m) or m.conn is not None:
                self.stats["connects_refused"] += 1
                answer(ev="error", reason="not connectable")
                return
            cid = self._next_conn
            self._next_conn += 1
            c = _Conn(cid, m, hub, req.get("confirm") == "manual")
            c.hub_mtu = min(int(req.get("mtu", self.cfg["hub_max_mtu"])),
                            self.cfg["hub_max_mtu"])
            if self.cfg["t0"] == "first_connection" and not self._t0_set:
                self._t0 = time.monotonic()
                self._t0_set = True
            self._conns[cid] = c
            hub.conns.add(cid)
            m.conn = c
            m.adv = None  # a connectable advert stops at the connection (Vol 6 Part B §4.4.2)
            self.stats["connects"] += 1
            m.send(ord("C"), struct.pack(">HB", cid, 1) + hub_addr(hub))
            answer(conn=cid, name=m.name)
        elif op == "range":
            self._forced[req["name"]] = bool(req["in"])
            if req.get("clear"):
                self._forced.pop(req["name"], None)
            answer(ok=True)
        elif op == "stats":
            answer(stats=dict(self.stats))
        elif c is None:
            answer(ev="error", reason="no such connection")
        elif op == "discover":
            chars = [{"handle": h, "uuid": str(v["uuid"]), "flags": v["flags"]}
                     for h, v in sorted(c.module.chars.items())]
            answer(service=str(c.module.service), chars=chars)
        elif op == "subscribe":
            h = int(req["handle"])
            ch = c.module.chars.get(h)
            if ch is None or not ch["flags"] & (gatt.F_INDICATE | gatt.F_NOTIFY):
                answer(status=gatt.ATT_WRITE_NOT_PERMITTED)
                return
            if req.get("on", True):
                c.subscribed.add(h)
            else:
                c.subscribed.discard(h)
            answer(status=0)
        elif op == "mtu":
            c.hub_mtu = min(int(req["mtu"]), self.cfg["hub_max_mtu"])
            self._exchange_mtu(c, gatt.MAX_ATT_MTU)
            answer(ok=True)
        elif op == "read":
            self._hub_read(c, int(req["handle"]), answer)
        elif op == "write":
            self._hub_write(c, int(req["handle"]), bytes.fromhex(req["data"]), answer)
        elif op == "confirm":
            answer(ok=self._confirm(c, c.indication))
        elif op == "disconnect":
            self._drop(c, R_REMOTE, R_LOCAL)
            answer(ok=True)
        else:
            answer(ev="error", reason="unknown op")

    def _hub_read(self, c, h, answer):
        ch = c.module.chars.get(h)
        if ch is None:
            status = gatt.ATT_INVALID_HANDLE
        elif not ch["flags"] & gatt.F_READ:
            status = gatt.ATT_READ_NOT_PERMITTED
        elif ch["flags"] & gatt.F_READ_ENCRYPTED and not c.encrypted:
            status = gatt.ATT_INSUFFICIENT_ENCRYPTION
        else:
            status = 0
        if status:
            self.stats["reads_refused"] += 1
            answer(status=status)
            return
        self.stats["reads"] += 1
        value = ch["value"][: c.mtu - 1]  # ATT_READ_RSP carries at most ATT_MTU - 1
        _, answered = self._transfer(c, "down_free", 3)
        self._loop.call_at(answered, lambda: answer(status=0, data=value.hex()))

    def _hub_write(self, c, h, data, answer):
        ch = c.module.chars.get(h)
        if ch is None:
            status = gatt.ATT_INVALID_HANDLE
        elif not ch["flags"] & gatt.F_WRITABLE:
            status = gatt.ATT_WRITE_NOT_PERMITTED
        elif ch["flags"] & gatt.F_WRITE_ENCRYPTED and not c.encrypted:
            status = gatt.ATT_INSUFFICIENT_ENCRYPTION
        elif len(data) > c.mtu - 3:
            status = gatt.ATT_INVALID_ATTRIBUTE_LENGTH
        else:
            status = 0
        if status:
            self.stats["writes_refused"] += 1
            answer(status=status)
            return
        self.stats["writes"] += 1
        self.stats["write_bytes"] += len(data)
        delivered, answered = self._transfer(c, "down_free", len(data))

        def deliver():
            if c.alive:
                ch["value"] = data
                c.module.send(ord("W"), struct.pack(">HH", c.cid, h) + data)

        def respond():
            answer(status=0 if c.alive else -1)

        self._loop.call_at(delivered, deliver)
        self._loop.call_at(answered, respond)


def hub_addr(hub):
    n = id(hub) & 0xFFFF
    return bytes([0xD0, 0, 0, 0, n >> 8, n & 0xFF])
