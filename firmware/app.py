# The application: one asyncio loop of long-lived tasks, built from the config by main.py.
#
#   pump link   the pump driver's reader task (frames, ACK/NAK, keep-alive, events)
#   poller      polls the pump status every poll_period_ms; a change -> a record at once
#   events      spontaneous pump events and link conditions -> records at once (an alarm
#               never waits for the next poll)
#   supervisor  watchdog, gc at a known point, memory gauges, the periodic health record
#
# Every record is made in one place, Recorder.emit(): it takes the next sequence number from
# the sink, encodes the record (firmware/record.py) into one preallocated buffer and hands it
# to the sink, all under one lock, so sequence order is production order. The sink is where a
# record goes next: printed (LogSink, the bench before sealing) or sealed and stored.
import asyncio
import gc
import sys
import time

from micropython import const

from firmware import health as H
from firmware import log, record

_log = log.Logger("app")

_RESTART_BACKOFF_MS = const(1000)  # a crashed task waits this long before it restarts
_RESTARTS_BEFORE_RESET = const(5)  # more restarts than this in _RESTART_WINDOW_MS: escalate
_RESTART_WINDOW_MS = const(60_000)
_CONNECT_BACKOFF_MIN_MS = const(1000)  # pump (re)connection backoff: 1 s doubling to 30 s
_CONNECT_BACKOFF_MAX_MS = const(30_000)
_SUPERVISOR_PERIOD_MS = const(1000)  # < watchdog_ms / 4 for every sane watchdog setting
_ROTATE_RETRY_MS = const(60_000)  # a failed epoch rotation is tried again a minute later
# The closing checkpoint at shutdown: one Generate Signature (80 ms of chip time, specs/
# stsafe-a110.md §1 table) within the driver's 830 ms busy budget per exchange, a retry or two
# and the outbox append: 5 s. After a KeyboardInterrupt a dead task may hold a lock: the
# wait is bounded so that the process always exits.
_SHUTDOWN_MS = const(5000)


class LogSink:
    """Prints each record as a log line `I rec: seq=N kind=K cbor=HEX` (bench, pre-sealing)."""

    def __init__(self):
        self._seq = 0
        self._log = log.Logger("rec")

    def next_seq(self):
        self._seq += 1
        return self._seq

    async def put(self, kind, seq, cbor):
        from binascii import hexlify

        self._log.info("seq=%d kind=%s cbor=%s", seq, record.KIND_NAMES[kind],
                       hexlify(cbor).decode())


class Recorder:
    def __init__(self, sink, health, clock=time.time):
        self.sink = sink
        self.health = health
        self.clock = clock
        self.enc = record.RecordEncoder()
        self._lock = asyncio.Lock()

    async def exclusive(self, fn):
        """Run the coroutine function fn with no record being made (epoch rotation)."""
        async with self._lock:
            return await fn()

    async def emit(self, kind, build, *args, urgent=False):
        """build(seq, t, *args) -> memoryview: one of RecordEncoder's methods. urgent: the
        record is an alarm, the sink (if it can) tells the link (firmware/link.py urgent)."""
        async with self._lock:
            seq = self.sink.next_seq()
            cbor = build(seq, int(self.clock()), *args)
            await self.sink.put(kind, seq, cbor)
            if urgent and hasattr(self.sink, "urgent"):
                self.sink.urgent()
            self.health.count(H.RECORDS)
        return seq


class App:
    def __init__(self, cfg, pump, pump_api, delivery=None, watchdog=None, clock=time.time,
                 health=None):
        self.cfg = cfg
        self.pump = pump
        self.api = pump_api  # drivers/pump/base.py: PumpStatus, PumpError family, EV_*, COND_*
        self.health = health or H.Health()
        self.delivery = delivery  # firmware/delivery.py, or None: records are only printed
        self.rec = Recorder(delivery.sink if delivery else LogSink(), self.health, clock)
        self.wdt = watchdog
        self.status = pump_api.PumpStatus()
        self.last = pump_api.PumpStatus()
        self._have_last = False
        self._last_status_ms = 0
        self._restarts = []
        self._was_connected = False
        self._reidentify = False  # the driver reopened the session: who is there now?
        self._ready = False  # records can be made (the epoch exists)

    # -- records ---------------------------------------------------------------------------

    def _changed(self):
        """Any clinical field changed since the last status record, volume progress aside."""
        s, p = self.status, self.last
        return (s.rate != p.rate or s.state != p.state or s.alarms != p.alarms
                or s.dose != p.dose or s.error != p.error or s.mode != p.mode
                or s.power != p.power or s.flush_rate != p.flush_rate
                or s.flush_volume != p.flush_volume)

    def _remember(self):
        s, p = self.status, self.last
        for name, _ in record.STATUS_FIELDS:
            setattr(p, name, getattr(s, name))
        self._have_last = True

    async def _status_record(self):
        now = time.ticks_ms()
        due = time.ticks_diff(now, self._last_status_ms) >= self.cfg["status_every_s"] * 1000
        reset = self._have_last and 0 <= self.status.volume < self.last.volume
        if reset:
            # The pump's counter went down (reset or power cycle): say so, with the volume it
            # had reached, and record the new baseline at once.
            await self.rec.emit(record.KIND_MODULE, self.rec.enc.coded, record.KIND_MODULE,
                                record.MOD_VOLUME_RESET, self.last.volume)
        if reset or not self._have_last or due or self._changed():
            await self.rec.emit(record.KIND_STATUS, self.rec.enc.status, self.status)
            self._remember()
            self._last_status_ms = now

    async def _module_event(self, code, detail=-1):
        await self.rec.emit(record.KIND_MODULE, self.rec.enc.coded, record.KIND_MODULE,
                            code, detail)

    # -- tasks -----------------------------------------------------------------------------

    async def _connect(self):
        backoff = _CONNECT_BACKOFF_MIN_MS
        while True:
            try:
                ident = await self.pump.connect()
            except self.api.PumpError as e:
                _log.warn("pump connect failed: %s; retry in %d ms", e, backoff)
                await asyncio.sleep_ms(backoff)
                backoff = min(backoff * 2, _CONNECT_BACKOFF_MAX_MS)
                continue
            _log.info("pump connected: %s %s %s", ident.device_type, ident.serial,
                      ident.firmware)
            if self._was_connected:
                self.health.count(H.RECONNECTS)
                await self._module_event(record.MOD_PUMP_RECONNECTED)
            self._was_connected = True
            await self.rec.emit(record.KIND_IDENTITY, self.rec.enc.identity, ident)
            return

    async def poller(self):
        period = self.cfg["poll_period_ms"]
        await self._connect()
        while True:
            started = time.ticks_ms()
            if self._reidentify:
                # The driver reopened the session by itself (the pump lost it: a power cycle,
                # or a silence): identify again, since another pump may now be on the line.
                self._reidentify = False
                await self._connect()
            try:
                await self.pump.poll(self.status)
                self.health.count(H.POLLS)
                await self._status_record()
            except self.api.PumpDisconnected:
                self.health.count(H.POLL_FAILURES)
                _log.warn("pump disconnected")
                await self._module_event(record.MOD_PUMP_DISCONNECTED)
                await self._connect()
            except self.api.PumpError as e:
                # The driver has queued the link condition; it becomes a record in events().
                self.health.count(H.POLL_FAILURES)
                _log.warn("pump poll failed: %s", e)
            wait = period - time.ticks_diff(time.ticks_ms(), started)
            await asyncio.sleep_ms(wait if wait > 0 else 0)

    async def events(self):
        api = self.api
        while True:
            ev = await self.pump.next_event()
            if ev.kind == api.EV_PUMP:
                self.health.count(H.PUMP_EVENTS)
                _log.info("pump event %s", ev.values)
                alarms = ev.values.get("a", 0)  # var a: the alarm bitmask
                await self.rec.emit(record.KIND_PUMP_EVENT, self.rec.enc.pump_event, ev.values,
                                    urgent=isinstance(alarms, int) and alarms > 0)
            else:
                self.health.count(H.LINK_CONDITIONS)
                if ev.code == api.COND_RECONNECTED:
                    self._reidentify = True
                _log.warn("pump link: %s %s", api.cond_name(ev.code), ev.values)
                detail = -1
                for v in ev.values.values():
                    if isinstance(v, int):
                        detail = v
                        break
                await self.rec.emit(record.KIND_LINK, self.rec.enc.coded, record.KIND_LINK,
                                    ev.code, detail)

    async def supervisor(self):
        period_s = self.cfg["health_period_s"]
        last_health = time.ticks_ms()
        rotate_ms = self.cfg["epoch_rotate_s"] * 1000
        last_rotate = time.ticks_ms()
        c = self.health.counters
        while True:
            if self.wdt is not None and not self._escalating():
                self.wdt.feed()
            c[H.MEM_HIGH] = max(c[H.MEM_HIGH], gc.mem_alloc())
            gc.collect()  # the known quiet point: once a second, between records
            c[H.MEM_LIVE_MAX] = max(c[H.MEM_LIVE_MAX], gc.mem_alloc())
            if self.delivery is not None and self._ready:
                self.delivery.housekeeping()
                if rotate_ms and time.ticks_diff(time.ticks_ms(), last_rotate) >= rotate_ms:
                    last_rotate = time.ticks_ms()
                    if not await self._rotate():
                        last_rotate = time.ticks_add(last_rotate, _ROTATE_RETRY_MS - rotate_ms)
            if self._ready and time.ticks_diff(time.ticks_ms(), last_health) >= period_s * 1000:
                last_health = time.ticks_ms()
                await self.rec.emit(record.KIND_MODULE, self.rec.enc.health,
                                    self.health.counters)
            await asyncio.sleep_ms(_SUPERVISOR_PERIOD_MS)

    async def _rotate(self):
        from firmware.delivery import SE_FAILURES

        try:
            ep = await self.rec.exclusive(self.delivery.rotate)
        except SE_FAILURES as e:  # the current epoch goes on
            self.health.count(H.SE_ERRORS)
            _log.error("epoch rotation failed: %s %s", type(e).__name__, e)
            return False
        _log.info("epoch rotated to %d", ep.number)
        return True

    # -- resilience ------------------------------------------------------------------------

    def _escalating(self):
        """Too many task restarts lately: stop feeding the watchdog so the board resets."""
        if not self._restarts:
            return False  # the usual case: no list made every second
        now = time.ticks_ms()
        self._restarts = [t for t in self._restarts
                          if time.ticks_diff(now, t) < _RESTART_WINDOW_MS]
        return len(self._restarts) > _RESTARTS_BEFORE_RESET

    async def _guard(self, name, factory):
        # The top of a long-lived task: whatever kills it (MemoryError included) is named in
        # the log and the health record, and the task is restarted; repeated deaths escalate
        # to a watchdog reset (see _escalating).
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - logged, counted, restarted, escalated
                self.health.count(H.TASK_RESTARTS)
                self._restarts.append(time.ticks_ms())
                _log.error("task %s died: %s %s", name, type(e).__name__, e)
                sys.print_exception(e)
                await asyncio.sleep_ms(_RESTART_BACKOFF_MS)

    async def run(self, run_for_s=0):
        # The pump link (keep-alive answers) and the supervisor (watchdog) run from the
        # start; records are made once the epoch exists: nothing can be sealed before it, and
        # a plaintext record never goes to flash.
        tasks = [asyncio.create_task(self._guard("pump", self.pump.run)),
                 asyncio.create_task(self._guard("supervisor", self.supervisor))]
        try:
            if self.delivery is not None:
                await self.delivery.start()
            self._ready = True
            await self._module_event(record.MOD_BOOT)
            named = [("poller", self.poller), ("events", self.events)]
            if self.delivery is not None:
                named += self.delivery.tasks()
            tasks += [asyncio.create_task(self._guard(name, fn)) for name, fn in named]
            if run_for_s > 0:
                await asyncio.sleep(run_for_s)
                for t in (tasks[0], tasks[2], tasks[3]):  # pump, poller, events
                    t.cancel()
                await self.shutdown()  # the closing checkpoint goes out with the drain
                await self._drain()
            else:
                await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            self.summary()

    async def shutdown(self):
        """Clean stop: no record is made any more, and the current epoch is closed by its
        closing checkpoint (firmware/sealing.py). Bounded in time; never raises."""
        self._ready = False  # the supervisor makes no health record and no rotation now
        if self.delivery is None or self.delivery.sink.ep is None:
            return
        try:
            ok = await asyncio.wait_for_ms(self.rec.exclusive(self.delivery.close),
                                           _SHUTDOWN_MS)
        except Exception as e:  # noqa: BLE001 - at shutdown: named, the process exits anyway
            if isinstance(e, MemoryError):
                raise
            ok = False
            _log.error("shutdown: %s %s", type(e).__name__, e)
        _log.info("shutdown: epoch %d %s", self.delivery.sink.ep.number,
                  "closed" if ok else "NOT closed (closed at the next boot)")

    async def _drain(self):
        """Bench and tests: after shutdown(), let delivery empty the outbox (drain_s)."""
        if self.delivery is None:
            return
        deadline = time.ticks_add(time.ticks_ms(), self.cfg["drain_s"] * 1000)
        while not self.delivery.drained() and time.ticks_diff(deadline, time.ticks_ms()) > 0:
            await asyncio.sleep_ms(100)
        _log.info("drain: outbox %s", "empty" if self.delivery.drained() else "NOT empty")

    def summary(self):
        """One machine-readable line for the bench: health counters and peak heap."""
        import json

        out = {H.NAMES[k]: v for k, v in self.health.counters.items()}
        if self.delivery is not None:
            out.update(self.delivery.summary())
        print("SUMMARY " + json.dumps(out))


def build(cfg):
    """Wire the app for cfg["board"] (firmware/boards/)."""
    from firmware import boards

    board = boards.load(cfg["board"])
    if cfg["pump_protocol"] != "fkbase":
        raise ValueError("unknown pump protocol: %s" % cfg["pump_protocol"])
    from drivers.pump import base as pump_api
    from drivers.pump import fkbase

    # Once everything is imported, what the heap holds is code (loaded from .mpy into RAM on
    # the unix port; in flash when frozen on the board): that is MEM_CODE.
    if cfg["identity"]:
        if cfg["radio"] == "lora":
            import drivers.lorawan.device  # noqa: F401
            import drivers.lorawan.store  # noqa: F401
            import drivers.radio.lora  # noqa: F401

            board.lora_modem_module()  # the modem driver's code, counted in MEM_CODE too
        else:
            import drivers.radio.ltem  # noqa: F401 - imported now so MEM_CODE counts it
        import drivers.stsafe  # noqa: F401
        import firmware.delivery  # noqa: F401
    gc.collect()
    health = H.Health()
    health.gauge(H.MEM_CODE, gc.mem_alloc())
    delivery = None
    data_dir = board.prepare_storage(cfg)
    if cfg["identity"]:
        delivery = _build_delivery(cfg, board, health, data_dir)
    stream = board.open_pump_stream(cfg)
    pump = fkbase.FKBasePump(stream, address=cfg["pump_address"].encode())
    return App(cfg, pump, pump_api, delivery, board.watchdog(cfg), health=health)


class _SeKeys:
    """The LoRaWAN MAC's key hooks on the secure element's local envelope (Wrap / Unwrap
    Local Envelope): the AppKey is unwrapped into RAM for each join (appkey), the session
    keys are stored wrapped (wrap / unwrap: the session survives a reboot)."""

    def __init__(self, se, slot, appkey_envelope):
        self.se = se
        self.slot = slot
        self.env = appkey_envelope

    async def appkey(self):
        return await self.se.unwrap(self.slot, self.env)

    async def wrap(self, data):
        return await self.se.wrap(self.slot, data)

    async def unwrap(self, data):
        return await self.se.unwrap(self.slot, data)


def _lora_radio(cfg, board, ident, se, data_dir):
    from drivers.lorawan.device import Device
    from drivers.lorawan.store import DirStore
    from drivers.radio.lora import LoraRadio

    if ident.lorawan is None:
        raise ValueError("radio lora: the identity file has no lorawan keys (serene provision)")
    dev_eui, join_eui, env = ident.lorawan
    keys = _SeKeys(se, ident.envelope_key_slot, env)
    margin = cfg["lora_rx_margin_ms"] or board.lora_rx_margin_ms()
    device = Device(board.lora_modem(cfg), DirStore(data_dir + "/lorawan"), dev_eui, join_eui,
                    keys.appkey, key_wrapper=keys, join_dr=cfg["lora_dr"], adr=cfg["lora_adr"],
                    rx_margin_ms=margin)
    return LoraRadio(device)


def _build_delivery(cfg, board, health, data_dir):
    from drivers.stsafe import STSAFE
    from firmware import identity
    from firmware.delivery import Delivery

    ident = identity.load(cfg["identity"])
    se = STSAFE(board.open_se_bus(cfg), addr=ident.i2c_address,
                host_mac_key=ident.host_mac_key, host_cipher_key=ident.host_cipher_key)
    if cfg["radio"] == "lora":
        return Delivery(cfg, ident, se, _lora_radio(cfg, board, ident, se, data_dir), health,
                        data_dir)
    from drivers.radio.ltem import LtemRadio

    pin = None
    if cfg["mqtt_tls_pin"]:
        with open(cfg["mqtt_tls_pin"], "rb") as f:
            pin = f.read()
    radio = LtemRadio(ident.device_id, cfg["mqtt_host"], cfg["mqtt_port"],
                      cfg["mqtt_user"] or ident.device_id, cfg["mqtt_password"], tls_pin=pin,
                      netif=board.modem_netif(cfg))
    return Delivery(cfg, ident, se, radio, health, data_dir)


def main(config_path="config.json", overrides=None):
    from firmware import config

    cfg = config.load(config_path, overrides)
    log.set_level(cfg["log_level"])
    app = build(cfg)
    try:
        asyncio.run(app.run(cfg["run_for_s"]))
    except KeyboardInterrupt:
        # Ctrl-C (the bench's SIGINT) lands at any bytecode: between an outbox append and its
        # checkpoint accounting, or inside the append. Nothing more is written then, as after
        # a power cut: the next boot recovers the outbox from flash and closes the epoch with a
        # tail checkpoint over exactly what is stored. A closing checkpoint signed from the RAM
        # state here could miss the record being stored and make the server report a false
        # checkpoint mismatch. The clean stop that closes the epoch is shutdown() (run_for_s).
        _log.info("interrupted: epoch left open (closed at the next boot)")
        app.summary()
    finally:
        asyncio.new_event_loop()
