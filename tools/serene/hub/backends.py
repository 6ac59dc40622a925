"""Hub backends: how the hub reaches BLE. Both offer the same asyncio interface:

    await b.open(); await b.close()
    await b.scan() -> [{"addr", "name", "services": [uuid.UUID]}]
    await b.connect(addr) -> conn          (raises BackendError)
    await b.discover(conn) -> {"chars": [{"handle", "uuid" (str), "flags"}]}
    await b.subscribe(conn, handle) -> ATT status (0 = ok)
    await b.write(conn, handle, data) -> ATT status
    await b.read(conn, handle) -> (status, bytes)
    await b.disconnect(conn)
    b.events: asyncio.Queue of {"ev": "indication", "conn", "data" (bytes)} and
              {"ev": "disconnected", "conn"}

SimBackend is the BLE medium simulator's socket (serene.ble.medium), and is what the tests use.
BleakBackend drives a real adapter through `bleak` (an optional extra, `pip install bleak`,
imported only here when chosen). It CANNOT be tested on the project's machines (no Bluetooth
controller, no BlueZ; /work/shared/TOOLCHAIN.md): it is written against bleak's documented API
and has never run.
"""

import asyncio

from ..ble import gatt
from ..ble.client import MediumClient, MediumError


class BackendError(Exception):
    """A backend operation failed. `op`, `reason`."""

    def __init__(self, op, reason):
        super().__init__("%s: %s" % (op, reason))
        self.op = op
        self.reason = reason


class SimBackend:
    def __init__(self, port, host="127.0.0.1", manual_confirm=False):
        self.port = port
        self.host = host
        self.manual_confirm = manual_confirm
        self.events = asyncio.Queue()
        self._c = None
        self._pump = None

    async def open(self):
        self._c = await MediumClient.open(self.port, self.host)
        self._pump = asyncio.ensure_future(self._events())

    async def _events(self):
        while True:
            ev = await self._c.events.get()
            if ev["ev"] == "indication":
                await self.events.put({"ev": "indication", "conn": ev["conn"],
                                       "data": bytes.fromhex(ev["data"])})
            elif ev["ev"] in ("disconnected", "closed"):
                await self.events.put({"ev": "disconnected", "conn": ev.get("conn")})

    async def close(self):
        if self._pump:
            self._pump.cancel()
        if self._c:
            await self._c.close()

    async def _call(self, op, coro):
        try:
            return await coro
        except MediumError as e:
            raise BackendError(op, e.reason) from None

    async def scan(self):
        return await self._call("scan", self._c.scan())

    async def connect(self, addr):
        return await self._call("connect", self._c.connect(
            addr, confirm="manual" if self.manual_confirm else "auto"))

    async def discover(self, conn):
        return await self._call("discover", self._c.discover(conn))

    async def subscribe(self, conn, handle):
        return await self._call("subscribe", self._c.subscribe(conn, handle))

    async def write(self, conn, handle, data):
        return await self._call("write", self._c.write(conn, handle, data))

    async def read(self, conn, handle):
        return await self._call("read", self._c.read(conn, handle))

    async def disconnect(self, conn):
        try:
            await self._c.disconnect(conn)
        except MediumError:
            pass


class BleakBackend:
    """A real adapter through bleak (BleakScanner, BleakClient). UNTESTED here: the project's
    machines have no Bluetooth controller; see the module docstring. Handles are bleak's
    characteristic handles; pairing is requested with BleakClient.pair() (BlueZ/WinRT)."""

    def __init__(self, scan_s=2.0):
        self.scan_s = scan_s
        self.events = asyncio.Queue()
        self._clients = {}
        self._devices = {}

    async def open(self):
        import bleak  # noqa: F401  (optional extra: fail here, clearly, if absent)

    async def close(self):
        for conn in list(self._clients):
            await self.disconnect(conn)

    async def scan(self):
        from bleak import BleakScanner

        found = await BleakScanner.discover(timeout=self.scan_s, return_adv=True,
                                            service_uuids=[str(gatt.SERVICE)])
        out = []
        for addr, (dev, adv) in found.items():
            self._devices[addr] = dev
            out.append({"addr": addr, "name": adv.local_name,
                        "services": [gatt.uuid.UUID(u) for u in adv.service_uuids]})
        return out

    async def connect(self, addr):
        from bleak import BleakClient

        loop = asyncio.get_running_loop()

        def gone(_client):
            loop.call_soon_threadsafe(self.events.put_nowait,
                                      {"ev": "disconnected", "conn": addr})

        client = BleakClient(self._devices.get(addr, addr), disconnected_callback=gone)
        try:
            await client.connect()
            await client.pair()
        except Exception as e:  # bleak raises BleakError and OS-specific errors
            raise BackendError("connect", repr(e)) from None
        self._clients[addr] = client
        return addr

    async def discover(self, conn):
        client = self._clients[conn]
        chars = []
        for svc in client.services:
            if svc.uuid != str(gatt.SERVICE):
                continue
            for ch in svc.characteristics:
                flags = 0
                for p, bit in (("read", gatt.F_READ), ("write", gatt.F_WRITE),
                               ("write-without-response", gatt.F_WRITE_NO_RESPONSE),
                               ("notify", gatt.F_NOTIFY), ("indicate", gatt.F_INDICATE)):
                    if p in ch.properties:
                        flags |= bit
                chars.append({"handle": ch.handle, "uuid": ch.uuid, "flags": flags})
        return {"chars": chars}

    async def subscribe(self, conn, handle):
        client = self._clients[conn]
        loop = asyncio.get_running_loop()

        def cb(_ch, data):
            loop.call_soon_threadsafe(self.events.put_nowait,
                                      {"ev": "indication", "conn": conn, "data": bytes(data)})

        await client.start_notify(handle, cb)
        return 0

    async def write(self, conn, handle, data):
        try:
            await self._clients[conn].write_gatt_char(handle, bytes(data), response=True)
            return 0
        except Exception as e:
            raise BackendError("write", repr(e)) from None

    async def read(self, conn, handle):
        return 0, bytes(await self._clients[conn].read_gatt_char(handle))

    async def disconnect(self, conn):
        client = self._clients.pop(conn, None)
        if client is not None:
            await client.disconnect()
