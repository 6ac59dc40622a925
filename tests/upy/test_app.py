# The application's tasks against a scripted fake pump: what becomes a record, and when.
import asyncio

from drivers.pump import base as api
from firmware import app as app_mod
from firmware import config, record
from firmware import health as H
from firmware.cbor import decode


class CaptureSink:
    def __init__(self):
        self.seq = 0
        self.records = []

    def next_seq(self):
        self.seq += 1
        return self.seq

    async def put(self, kind, seq, cbor):
        self.records.append(decode(bytes(cbor)))

    def kinds(self):
        return [r[0] for r in self.records]


class FakePump:
    """poll() answers from `statuses` (dicts) or raises the exception found there."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.events = []
        self._flag = asyncio.Event()
        self.connects = 0
        self.polls = 0

    async def run(self):
        while True:
            await asyncio.sleep(3600)

    async def connect(self):
        self.connects += 1
        return api.PumpIdentity("APPLIX", "S%d" % self.connects, "1.0")

    async def poll(self, status):
        self.polls += 1
        item = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(item, Exception):
            raise item
        status.clear()
        for k, v in item.items():
            setattr(status, k, v)

    def push(self, ev):
        self.events.append(ev)
        self._flag.set()

    async def next_event(self):
        while not self.events:
            self._flag.clear()
            await self._flag.wait()
        return self.events.pop(0)


RUNNING = {"rate": 1250, "volume": 1000, "state": 2, "alarms": 0}


def make(pump, **cfg):
    c = config.load(None, dict({"board": "unix", "poll_period_ms": 20, "status_every_s": 3600,
                                "health_period_s": 3600}, **cfg))
    sink = CaptureSink()
    a = app_mod.App(c, pump, api)
    a.rec.sink = sink
    return a, sink


async def run_for(a, ms):
    t = asyncio.create_task(a.run())
    await asyncio.sleep_ms(ms)
    t.cancel()
    try:
        await t
    except asyncio.CancelledError:
        pass


async def test_alarm_event_becomes_a_record_without_waiting_for_a_poll():
    pump = FakePump([RUNNING])
    a, sink = make(pump, poll_period_ms=60_000)  # the next poll is a minute away
    t = asyncio.create_task(a.run())
    await asyncio.sleep_ms(50)
    polls = pump.polls
    pump.push(api.PumpEvent(api.EV_PUMP, 0, {"a": 1, "u": 6}, 0))
    await asyncio.sleep_ms(20)
    t.cancel()
    ev = [r for r in sink.records if r[0] == record.KIND_PUMP_EVENT]
    assert len(ev) == 1, sink.records
    assert ev[0][6] == 1 and ev[0][7] == 6  # alarms bit 0 (occlusion), state 6 (alarm hold)
    assert pump.polls == polls  # no poll happened in between


async def test_status_records_on_change_not_on_every_poll():
    moving = dict(RUNNING)
    moving["volume"] = 1010  # volume progress alone is not a change
    paused = dict(RUNNING)
    paused["state"] = 1
    pump = FakePump([RUNNING, moving, moving, paused, paused, paused])
    a, sink = make(pump)
    await run_for(a, 200)
    status = [r for r in sink.records if r[0] == record.KIND_STATUS]
    assert [s[7] for s in status] == [2, 1], status  # the first reading, then the pause
    assert status[0][3] == 1000 and status[1][2] == 1250
    assert pump.polls >= 6


async def test_status_record_at_least_every_status_every_s():
    pump = FakePump([RUNNING])
    a, sink = make(pump, status_every_s=0)  # 0 s: every poll is due
    await run_for(a, 120)
    assert sink.kinds().count(record.KIND_STATUS) >= 3


async def test_volume_going_down_is_reported_as_a_reset():
    reset = dict(RUNNING)
    reset["volume"] = 0
    pump = FakePump([RUNNING, reset])
    a, sink = make(pump)
    await run_for(a, 100)
    resets = [r for r in sink.records
              if r[0] == record.KIND_MODULE and r[14] == record.MOD_VOLUME_RESET]
    assert len(resets) == 1 and resets[0][15] == 1000, sink.records
    status = [r for r in sink.records if r[0] == record.KIND_STATUS]
    assert status[-1][3] == 0  # the new baseline is recorded at once


async def test_disconnect_then_reconnect_is_recorded_and_polling_goes_on():
    pump = FakePump([RUNNING, api.PumpDisconnected({"failures": 3}), RUNNING])
    a, sink = make(pump)
    await run_for(a, 150)
    mods = [r[14] for r in sink.records if r[0] == record.KIND_MODULE]
    assert record.MOD_PUMP_DISCONNECTED in mods and record.MOD_PUMP_RECONNECTED in mods
    assert sink.kinds().count(record.KIND_IDENTITY) == 2  # identity again after reconnecting
    assert a.health.counters[H.RECONNECTS] == 1
    assert pump.polls >= 4


async def test_link_condition_becomes_a_record_with_its_detail():
    pump = FakePump([RUNNING])
    a, sink = make(pump)
    t = asyncio.create_task(a.run())
    await asyncio.sleep_ms(30)
    pump.push(api.PumpEvent(api.EV_LINK, api.COND_NAK, {"err": 0x36}, 0))
    await asyncio.sleep_ms(20)
    t.cancel()
    links = [r for r in sink.records if r[0] == record.KIND_LINK]
    assert links and links[0][14] == api.COND_NAK and links[0][15] == 0x36


async def test_an_unexpected_error_restarts_the_task_and_is_counted():
    pump = FakePump([RUNNING, KeyError("driver bug"), RUNNING])
    a, sink = make(pump)
    app_mod._RESTART_BACKOFF_MS = 10
    await run_for(a, 1300)  # the guard waits _RESTART_BACKOFF_MS (1 s) before restarting
    assert a.health.counters[H.TASK_RESTARTS] == 1
    assert a.health.counters[H.POLLS] >= 3  # polling resumed after the restart


async def test_sequence_numbers_follow_production_order():
    pump = FakePump([RUNNING])
    a, sink = make(pump, status_every_s=0)
    t = asyncio.create_task(a.run())
    await asyncio.sleep_ms(40)
    for _ in range(5):
        pump.push(api.PumpEvent(api.EV_PUMP, 0, {"a": 0}, 0))
    await asyncio.sleep_ms(40)
    t.cancel()
    seqs = [r[1] for r in sink.records]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


async def test_session_reopened_by_the_driver_makes_the_app_identify_the_pump_again():
    pump = FakePump([RUNNING])
    a, sink = make(pump)
    t = asyncio.create_task(a.run())
    await asyncio.sleep_ms(40)
    pump.push(api.PumpEvent(api.EV_LINK, api.COND_RECONNECTED, {"cause": 0}, 0))
    await asyncio.sleep_ms(60)
    t.cancel()
    idents = [r[16] for r in sink.records if r[0] == record.KIND_IDENTITY]
    assert idents == ["APPLIX/S1/1.0", "APPLIX/S2/1.0"], idents
    mods = [r[14] for r in sink.records if r[0] == record.KIND_MODULE]
    assert record.MOD_PUMP_RECONNECTED in mods


def test_plain_tcp_to_a_non_loopback_broker_is_refused_unless_explicit():
    # TLS with the pinned certificate is the default for a broker off this machine (issue 8,
    # item 9): no pin and no explicit mqtt_plain is a ConfigError naming mqtt_tls_pin.
    for host in ("10.0.0.5", "broker.example.org", "128.0.0.1"):
        try:
            config.load(overrides={"identity": "module.json", "mqtt_host": host})
        except config.ConfigError as e:
            assert e.key == "mqtt_tls_pin", e.key
        else:
            raise AssertionError("plain TCP to %s accepted" % host)
    for kw in ({"mqtt_host": "10.0.0.5", "mqtt_plain": True},
               {"mqtt_host": "10.0.0.5", "mqtt_tls_pin": "broker.der"},
               {"mqtt_host": "127.0.0.1"}, {"mqtt_host": "127.5.5.5"},
               {"mqtt_host": "localhost"}, {"mqtt_host": "::1"}):
        kw["identity"] = "module.json"
        config.load(overrides=kw)
    assert config.DEFAULTS["mqtt_plain"] is False
    try:
        config.load(overrides={"mqtt_plain": 1})
    except config.ConfigError as e:
        assert e.key == "mqtt_plain"
    else:
        raise AssertionError("a non-boolean mqtt_plain accepted")


def test_radio_choice_and_lora_keys_in_the_identity():
    from firmware import identity

    assert config.DEFAULTS["radio"] == "ltem" and config.DEFAULTS["lora_dr"] == 5
    cfg = config.load(overrides={"radio": "lora", "lora_dr": 0, "identity": "module.json",
                                 "mqtt_host": "10.0.0.5"})  # no MQTT broker on LoRa
    assert cfg["radio"] == "lora" and cfg["lora_dr"] == 0
    for kw, key in (({"radio": "wifi"}, "radio"), ({"lora_dr": 6}, "lora_dr"),
                    ({"lora_dr": -1}, "lora_dr"), ({"radio": 1}, "radio")):
        try:
            config.load(overrides=kw)
        except config.ConfigError as e:
            assert e.key == key, (kw, e.key)
        else:
            raise AssertionError("accepted %r" % kw)
    base = {"format": identity.FORMAT, "device_id": "SRN-0001", "i2c_address": 32,
            "host_mac_key": "00" * 16, "host_cipher_key": "11" * 16,
            "zones": {"certificate": {"zone": 0}, "factory_key_slot": 0,
                      "server_key": {"zone": 5, "offset": 0, "length": 65},
                      "epoch_counter": {"zone": 6}}}
    assert identity.Identity(base).lorawan is None
    base["lorawan"] = {"dev_eui": "0004a30b001c0530", "join_eui": "70b3d57ed0000000",
                       "appkey_envelope": "ab" * 24}
    dev, join, env = identity.Identity(base).lorawan
    assert dev == bytes.fromhex("0004a30b001c0530") and len(join) == 8 and env == b"\xab" * 24
    base["lorawan"]["appkey_envelope"] = "ab" * 16  # a plain 16-byte key is not an envelope
    try:
        identity.Identity(base)
    except identity.IdentityError as e:
        assert e.field == "appkey_envelope"
    else:
        raise AssertionError("a 16-byte appkey accepted")


async def test_an_alarm_tells_the_sink_it_is_urgent_other_events_do_not():
    class UrgentSink(CaptureSink):
        def __init__(self):
            super().__init__()
            self.urgent_after = []

        def urgent(self):  # firmware/sealing.py SealingSink.urgent: the link is told
            self.urgent_after.append(self.records[-1][0])

    pump = FakePump([RUNNING])
    a, _ = make(pump, poll_period_ms=60_000)
    sink = a.rec.sink = UrgentSink()
    t = asyncio.create_task(a.run())
    await asyncio.sleep_ms(50)
    pump.push(api.PumpEvent(api.EV_PUMP, 0, {"u": 2}, 0))  # a state change: not urgent
    pump.push(api.PumpEvent(api.EV_PUMP, 0, {"a": 0, "u": 2}, 0))  # alarm cleared: not urgent
    pump.push(api.PumpEvent(api.EV_PUMP, 0, {"a": 1, "u": 6}, 0))  # occlusion: urgent
    await asyncio.sleep_ms(30)
    t.cancel()
    assert sink.urgent_after == [record.KIND_PUMP_EVENT], sink.urgent_after
    assert len([r for r in sink.records if r[0] == record.KIND_PUMP_EVENT]) == 3
