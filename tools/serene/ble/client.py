"""A hub's side of the simulated BLE medium (serene.ble.medium), for asyncio.

    c = await MediumClient.open(port)
    ads = await c.scan()                          # [{"addr", "name", "services"}]
    conn = await c.connect(addr, mtu=247)         # connection id
    chars = await c.discover(conn)                # {"service", "chars": [{handle, uuid, flags}]}
    await c.subscribe(conn, handle)               # CCCD: indications on
    status = await c.write(conn, handle, data)    # 0 or the ATT error code
    status, data = await c.read(conn, handle)
    ev = await c.events.get()                     # {"ev": "indication" | "disconnected" | "mtu"}

Every request has a deadline (``timeout_s``, 5 s: the slowest medium answer is a transfer of a
few connection events, far below it); a missing answer raises MediumError.
"""

import asyncio
import itertools
import json

from . import gatt

TIMEOUT_S = 5.0


class MediumError(Exception):
    """The medium refused or did not answer. `op`, `reason`: what and why."""

    def __init__(self, op, reason):
        super().__init__("%s: %s" % (op, reason))
        self.op = op
        self.reason = reason


class MediumClient:
    def __init__(self, reader, writer, timeout_s=TIMEOUT_S):
        self._r = reader
        self._w = writer
        self._ids = itertools.count(1)
        self._waiting = {}
        self.events = asyncio.Queue()
        self.timeout_s = timeout_s
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, port, host="127.0.0.1", timeout_s=TIMEOUT_S):
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        return cls(r, w, timeout_s)

    async def close(self):
        self._task.cancel()
        self._w.close()
        try:
            await self._task
        except (asyncio.CancelledError, ConnectionError):
            pass

    async def _read(self):
        try:
            while True:
                line = await self._r.readline()
                if not line:
                    break
                msg = json.loads(line)
                fut = self._waiting.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                elif msg.get("ev") in ("indication", "disconnected", "mtu"):
                    await self.events.put(msg)
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(MediumError("read", "medium closed"))
            await self.events.put({"ev": "closed"})

    async def request(self, op, **kw):
        rid = next(self._ids)
        kw.update(op=op, id=rid)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._w.write((json.dumps(kw) + "\n").encode())
        await self._w.drain()
        try:
            msg = await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError:
            self._waiting.pop(rid, None)
            raise MediumError(op, "no answer in %.1f s" % self.timeout_s) from None
        if msg.get("ev") == "error":
            raise MediumError(op, msg.get("reason"))
        return msg

    async def scan(self):
        msg = await self.request("scan")
        out = []
        for a in msg["adverts"]:
            adv, resp = bytes.fromhex(a["adv"]), bytes.fromhex(a["resp"])
            out.append({"addr": a["addr"], "name": gatt.ad_name(adv, resp),
                        "services": gatt.ad_services128(adv, resp)})
        return out

    async def connect(self, addr, mtu=gatt.MAX_ATT_MTU, confirm="auto"):
        return (await self.request("connect", addr=addr, mtu=mtu, confirm=confirm))["conn"]

    async def discover(self, conn):
        return await self.request("discover", conn=conn)

    async def subscribe(self, conn, handle, on=True):
        return (await self.request("subscribe", conn=conn, handle=handle, on=on))["status"]

    async def write(self, conn, handle, data):
        return (await self.request("write", conn=conn, handle=handle,
                                   data=bytes(data).hex()))["status"]

    async def read(self, conn, handle):
        msg = await self.request("read", conn=conn, handle=handle)
        return msg["status"], bytes.fromhex(msg.get("data", ""))

    async def confirm(self, conn):
        return (await self.request("confirm", conn=conn))["ok"]

    async def disconnect(self, conn):
        await self.request("disconnect", conn=conn)

    async def set_range(self, name, in_range=True, clear=False):
        await self.request("range", name=name, clear=clear, **{"in": in_range})

    async def stats(self):
        return (await self.request("stats"))["stats"]
