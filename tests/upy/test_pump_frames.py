# FK-Base ASCII driver (drivers/pump/fkbase.py) on the unix port, against
# /work/shared/specs/pump-protocol.md: the checksum and frame examples, the whole example
# exchange, every NAK error byte, the read-only allow-list. Expected bytes are the spec's own
# (copied from its examples), or built by pump_fake.frame() from the spec's checksum rule.
import asyncio

from pump_fake import FakeLine, frame, settle

from drivers.pump import base
from drivers.pump.fkbase import FKBasePump, checksum, encode_frame

ACK = b"\x06"
NAK = b"\x15"


def _raises(exc, fn, *args):
    try:
        fn(*args)
    except exc as e:
        return e
    raise AssertionError("no %s from %r" % (exc.__name__, args))


def _link_events(pump, code=None):
    out = []
    while True:
        ev = pump.event_nowait()
        if ev is None:
            return out
        if ev.kind == base.EV_LINK and (code is None or ev.code == code):
            out.append(ev)


def test_checksum_spec_examples():
    # spec: `PR;1F40` -> 47; `1DC` -> 47; `0DC` -> 48; `1LE;dr` -> 2C
    assert checksum(b"PR;1F40") == 0x47
    assert checksum(b"1DC") == 0x47
    assert checksum(b"0DC") == 0x48
    assert checksum(b"1LE;dr") == 0x2C


def test_encode_frame_exact_bytes_of_spec_example():
    # H->P frames of the spec's example exchange, byte for byte.
    assert encode_frame(b"1", b"DC") == b"\x02" + b"1DC" + b"47" + b"\x03"
    assert encode_frame(b"1", b"LF;b") == b"\x02" + b"1LF;b" + b"9F" + b"\x03"
    assert encode_frame(b"1", b"LE;durvta") == b"\x02" + b"1LE;durvta" + b"6C" + b"\x03"
    assert encode_frame(b"1", b"E") == b"\x02" + b"1E" + b"89" + b"\x03"
    assert encode_frame(b"1", b"LH;01") == b"\x02" + b"1LH;01" + b"9E" + b"\x03"
    assert encode_frame(b"0", b"DC") == b"\x021DC47\x03".replace(b"1DC47", b"0DC48")
    assert encode_frame(b"", b"DC") == b"\x02DC%02X\x03" % (0xFF - ((0x44 + 0x43) & 0xFF))


def test_encode_frame_rejects_bad_payloads():
    _raises(ValueError, encode_frame, b"1", b"LE;" + b"d" * 78)  # 81 chars
    assert len(encode_frame(b"1", b"LE;" + b"d" * 77)) == 1 + 1 + 80 + 2 + 1  # 80: allowed
    _raises(ValueError, encode_frame, b"1", b"LE;d\x03")
    _raises(ValueError, encode_frame, b"1", b"LE;d\xe9")


def test_allow_list_refuses_every_therapy_command():
    for payload in (
        b"RV",
        b"PR;1F40",
        b"PO",
        b"PB",
        b"SI",
        b"MO;2",
        b"MO;1",
        b"MO",
        b"FC",
        b"PR",
        b"pr;1F40",
        b"LEX;d",
        b"DCPR;1",
        b"",
        b";DC",
    ):
        e = _raises(base.PumpError, encode_frame, b"1", payload)
        assert e.kind == base.COND_FORBIDDEN, payload


async def test_driver_sends_only_allowed_commands_and_has_no_therapy_method():
    line = FakeLine(responder=_pump_ok)
    pump = FKBasePump(line, config={"ident_ids": b"b"})
    task = asyncio.create_task(pump.run())
    await pump.connect()
    st = base.PumpStatus()
    await pump.poll(st)
    await pump.read_log(1)
    line.feed(frame(b"1E;a1;u6"))
    await settle(line)
    cmds = set(p.split(b";")[0] for p in line.frames)
    assert cmds <= {b"DC", b"LF", b"LE", b"DE", b"LH", b"E"}, cmds
    for name in dir(pump):
        low = name.lower()
        for bad in ("rate", "bolus", "pause", "silence", "reset", "mode", "send", "raw"):
            assert not (low.startswith(bad) or low.startswith("_" + bad)) or name in (
                "_reply",
                "_reply_n",
                "_reply_flag",
            ), name
    # A caller reaching into the driver still cannot get a therapy frame onto the line.
    for payload in (b"PR;1F40", b"MO;2", b"RV", b"PO", b"PB", b"SI"):
        try:
            await pump._command(encode_frame(b"1", payload))
            raise AssertionError("sent " + str(payload))
        except base.PumpError as e:
            assert e.kind == base.COND_FORBIDDEN
    assert pump.counters["forbidden"] == 0  # refused at build time, nothing reached the pump
    cmds = set(p.split(b";")[0] for p in line.frames)
    assert cmds <= {b"DC", b"LF", b"LE", b"DE", b"LH", b"E"}, cmds
    pump.close()
    task.cancel()


# --- a scripted pump ------------------------------------------------------------------------
def _pump_ok(payload):
    # The spec's example replies, ACK first (P->H).
    if payload == b"DC":
        return ACK + b"\x02" + b"1C" + b"8B" + b"\x03"
    if payload == b"LF;b":
        return ACK + b"\x02" + b"1C;bAPPLIX" + b"20" + b"\x03"
    if payload.startswith(b"LE;"):
        return ACK + b"\x02" + b"1C;d4E2;u2;r186A0;vF4240;t1B0;a0" + b"C3" + b"\x03"
    if payload.startswith(b"DE;"):
        return ACK + frame(b"1C")
    if payload == b"LH;01":
        return ACK + frame(b"1C;q7;g3C;a1;u6;r186A0;e0")
    if payload == b"E":
        return ACK
    return ACK + frame(b"1I;01")


async def test_spec_example_exchange_byte_for_byte():
    line = FakeLine(responder=_pump_ok)
    pump = FKBasePump(line, config={"ident_ids": b"b", "poll_ids": b"durvta"})
    task = asyncio.create_task(pump.run())
    ident = await pump.connect()
    assert ident.device_type == "APPLIX"
    await settle(line)  # the reader's ACK of the last reply
    # H->P DC, then our ACK of 1C; LF;b (after the 1 s); ACK of C;bAPPLIX; DE; ACK
    expect = (
        b"\x02" + b"1DC" + b"47" + b"\x03" + ACK
        + frame(b"1DE;auez") + ACK
        + b"\x02" + b"1LF;b" + b"9F" + b"\x03" + ACK
    )  # fmt: skip
    assert bytes(line.tx) == expect, bytes(line.tx)
    line.tx = bytearray()
    line.scan = 0
    st = base.PumpStatus()
    await pump.poll(st)
    await settle(line)
    assert bytes(line.tx) == b"\x02" + b"1LE;durvta" + b"6C" + b"\x03" + ACK, bytes(line.tx)
    # 125.0 ml/h, running, 100.000 ml delivered, dose 1000 ml, 432 min left, no alarm
    assert (st.rate, st.state, st.volume, st.dose, st.remaining, st.alarms) == (
        1250,
        2,
        100000,
        1000000,
        432,
        0,
    )
    assert (st.error, st.mode, st.battery, st.power, st.flush_rate, st.flush_volume) == (
        -1,
        -1,
        -1,
        -1,
        -1,
        -1,
    )
    # P->H 02 "1E;a1;u6" "D6" 03  ->  H->P 06, then 02 "1E" "89" 03
    line.tx = bytearray()
    line.scan = 0
    line.feed(b"\x02" + b"1E;a1;u6" + b"D6" + b"\x03")
    ev = await pump.next_event(timeout_ms=500)
    await settle(line)
    assert ev.kind == base.EV_PUMP and ev.values == {"a": 1, "u": 6}, ev
    assert bytes(line.tx) == ACK + b"\x02" + b"1E" + b"89" + b"\x03", bytes(line.tx)
    # P->H 05  ->  H->P 14
    line.tx = bytearray()
    line.scan = 0
    line.feed(b"\x05")
    await settle(line)
    assert bytes(line.tx) == b"\x14"
    # error reply example: LH;01 answered 02 "1I;12" "E7" 03 -> PumpRefused(0x12)
    line.responder = lambda p: ACK + b"\x02" + b"1I;12" + b"E7" + b"\x03"
    line.tx = bytearray()
    line.scan = 0
    try:
        await pump.read_log(1)
        raise AssertionError("no PumpRefused")
    except base.PumpRefused as e:
        assert e.code == 0x12 and e.kind == base.COND_REFUSED
    await settle(line)
    assert bytes(line.tx) == b"\x02" + b"1LH;01" + b"9E" + b"\x03" + ACK
    refused = _link_events(pump, base.COND_REFUSED)
    assert len(refused) == 1 and refused[0].values["code"] == 0x12
    assert pump.counters["refused"] == 1
    pump.close()
    task.cancel()


async def test_read_log_entry_and_index_range():
    line = FakeLine(responder=_pump_ok)
    pump = FKBasePump(line, config={"ident_ids": b"b"})
    task = asyncio.create_task(pump.run())
    await pump.connect()
    entry = await pump.read_log(1)
    assert entry == {"q": 7, "g": 0x3C, "a": 1, "u": 6, "r": 100000, "e": 0}, entry
    for bad in (0, 65, -1):
        try:
            await pump.read_log(bad)
            raise AssertionError(bad)
        except ValueError:
            pass
    pump.close()
    task.cancel()


# --- receive path: every NAK error byte -----------------------------------------------------
async def _rx_case(data):
    """Feed data to a fresh driver's reader; return (bytes it wrote, link events)."""
    line = FakeLine()
    pump = FKBasePump(line)
    task = asyncio.create_task(pump.run())
    line.feed(data)
    await settle(line)
    await asyncio.sleep_ms(2)
    tx = bytes(line.tx)
    evs = _link_events(pump)
    pump.close()
    task.cancel()
    return tx, evs, pump


async def test_nak_2_bad_checksum():
    good = frame(b"1E;a1")
    bad = good[:-3] + (b"00" if good[-3:-1] != b"00" else b"01") + b"\x03"
    tx, evs, pump = await _rx_case(bad)
    assert tx == NAK + b"2", tx
    assert [e.code for e in evs] == [base.COND_CHECKSUM] and evs[0].values["err"] == ord("2")
    # lower-case checksum digits are not the spec's form
    tx, evs, _ = await _rx_case(frame(b"1E;a1").lower())
    assert tx == NAK + b"2", tx
    # no room for a checksum at all
    tx, evs, _ = await _rx_case(b"\x021\x03")
    assert tx == NAK + b"2" and evs[0].code == base.COND_CHECKSUM


async def test_nak_8_control_byte_in_frame():
    for ctl in (0x00, 0x01, 0x04, 0x05, 0x06, 0x10, 0x14, 0x15, 0x1B, 0x7F):
        f = frame(b"1E;a1")
        tx, evs, pump = await _rx_case(f[:4] + bytes([ctl]) + f[4:])
        assert tx == NAK + b"8", (ctl, tx)
        assert [e.code for e in evs] == [base.COND_CONTROL_IN_FRAME], (ctl, evs)
        assert evs[0].values["byte"] == ctl
        assert pump.counters["control_in_frame"] == 1
        assert pump.event_nowait() is None  # the damaged event was not delivered


async def test_nak_7_frame_over_80_chars_and_80_is_fine():
    payload80 = (b"E;a1" + b";w0" * 26)[:79] + b"0"  # E;a1;w0;w0...;w00
    assert len(payload80) == 80
    tx, evs, pump = await _rx_case(frame(b"1" + payload80))
    assert tx == ACK + frame(b"1E"), tx
    assert evs == []
    payload81 = payload80 + b"0"
    tx, evs, pump = await _rx_case(frame(b"1" + payload81))
    assert tx == NAK + b"7", tx
    assert [e.code for e in evs] == [base.COND_TOO_LONG] and evs[0].values["err"] == ord("7")
    # a runaway frame with no ETX at all: one NAK, then the next frame is received
    tx, evs, pump = await _rx_case(b"\x021" + b"A" * 300 + frame(b"1E;a2"))
    assert tx == NAK + b"7" + ACK + frame(b"1E"), tx


async def test_nak_1_byte_outside_7_bit_ascii():
    f = frame(b"1E;a1")
    tx, evs, _ = await _rx_case(f[:5] + b"\xe9" + f[5:])
    assert tx == NAK + b"1", tx
    assert [e.code for e in evs] == [base.COND_CHAR_ERROR]


async def test_nak_4_other_address():
    tx, evs, _ = await _rx_case(frame(b"2E;a1"))
    assert tx == NAK + b"4", tx
    assert [e.code for e in evs] == [base.COND_ADDRESS] and evs[0].values["byte"] == ord("2")


async def test_nak_6_when_ring_holds_only_pump_events_then_accepts_the_resend():
    line = FakeLine()
    pump = FKBasePump(line, config={"event_slots": 4})
    task = asyncio.create_task(pump.run())
    for i in range(4):
        line.feed(frame(b"1E;a%X" % i))
    await settle(line)
    line.tx = bytearray()
    line.feed(frame(b"1E;a9"))
    await settle(line)
    assert bytes(line.tx) == NAK + b"6", bytes(line.tx)
    assert pump.counters["event_overflow"] == 0  # refused, not dropped
    got = [pump.event_nowait().values["a"] for _ in range(4)]
    assert got == [0, 1, 2, 3]
    line.tx = bytearray()
    line.feed(frame(b"1E;a9"))  # the pump sends it again
    await settle(line)
    assert bytes(line.tx) == ACK + frame(b"1E")
    assert pump.event_nowait().values == {"a": 9}
    pump.close()
    task.cancel()


async def test_link_events_evicted_for_pump_events_and_overflow_reported():
    line = FakeLine()
    pump = FKBasePump(line, config={"event_slots": 4})
    task = asyncio.create_task(pump.run())
    line.feed(frame(b"1E;a1"))
    await settle(line)
    for _ in range(5):  # five checksum errors: 3 fit, 2 dropped
        line.feed(b"\x021E;a1FF\x03")
        await settle(line)
    line.feed(frame(b"1E;a2"))  # evicts the oldest link event
    await settle(line)
    kinds = []
    while True:
        ev = pump.event_nowait()
        if ev is None:
            break
        kinds.append((ev.kind, ev.code, ev.values))
    assert kinds[0] == (base.EV_PUMP, 0, {"a": 1}), kinds
    assert kinds[1][1] == base.COND_CHECKSUM and kinds[2][1] == base.COND_CHECKSUM
    assert kinds[3] == (base.EV_PUMP, 0, {"a": 2}), kinds
    assert kinds[4] == (base.EV_LINK, base.COND_EVENT_OVERFLOW, {"dropped": 3}), kinds
    assert len(kinds) == 5
    assert pump.counters["checksum"] == 5 and pump.counters["event_overflow"] == 1
    pump.close()
    task.cancel()


async def test_noise_and_stray_stx_resynchronise():
    good = frame(b"1E;a1;u6")
    tx, evs, pump = await _rx_case(b"\x41\x42\x00\xff" + b"\x021C;d" + good)
    assert tx == ACK + frame(b"1E"), tx
    # 4 noise bytes (reported at the STX that ends them), then a 5-byte frame cut by an STX
    assert [(e.code, e.values["n"]) for e in evs] == [(base.COND_NOISE, 4), (base.COND_NOISE, 5)]


async def test_received_nak_6_is_retried_once_other_naks_fail_at_once():
    for err in b"1245678":
        sent = []

        def responder(payload, err=err, sent=sent):
            if payload == b"DC":
                return ACK + frame(b"1C")
            if payload.startswith(b"DE"):
                return ACK + frame(b"1C")
            sent.append(payload)
            if len(sent) == 1:
                return NAK + bytes([err])
            return ACK + frame(b"1C;d4E2")

        line = FakeLine(responder=responder)
        pump = FKBasePump(line)
        pump._session = True  # as after connect(): this test is about one request's retry
        task = asyncio.create_task(pump.run())
        st = base.PumpStatus()
        try:
            await pump.poll(st)
            ok = True
        except base.PumpError as e:
            ok = False
            assert e.kind == base.COND_NAK and e.detail["err"] == err, (err, e)
        naks = _link_events(pump, base.COND_NAK)
        assert len(naks) == 1 and naks[0].values["err"] == err
        if err == ord("6"):
            assert ok and st.rate == 1250 and len(sent) == 2, (err, sent)
        else:
            assert not ok and len(sent) == 1, (err, sent)
        pump.close()
        task.cancel()


def test_receive_and_parse_of_a_poll_reply_allocate_nothing():
    # The per-byte receive path and the status parse work in preallocated buffers: 100 poll
    # replies (with the pump's ACK before and an ENQ after) leave the heap exactly as it was.
    import gc
    import time

    from drivers.pump.fkbase import parse_status

    pump = FKBasePump(FakeLine())
    rx = pump._rx
    mv = memoryview(bytearray(ACK + frame(b"1C;d4E2;u2;r186A0;vF4240;t1B0;a0;y64;z1") + b"\x05"))
    st = base.PumpStatus()

    def once():
        pump._waiting = True
        pump._reply_n = -1
        rx.feed(mv, 0, len(mv), time.ticks_ms())
        assert rx.out_n == 2  # ACK of the reply, DC4 for the ENQ
        rx.out_n = 0
        st.clear()
        if not parse_status(pump._reply, 1, pump._reply_n, st, pump._varmap):
            raise AssertionError("parse")

    once()
    gc.collect()
    a0 = gc.mem_alloc()
    for _ in range(100):
        once()
    grown = gc.mem_alloc() - a0
    assert grown == 0, grown
    assert (st.rate, st.volume, st.battery, st.power) == (1250, 100000, 100, 1)


async def test_silent_pump_disconnects_then_connect_reports_reconnected():
    # max_failures 1 (config overrides the (P) table) keeps this short: one poll that times
    # out twice (1 s + the one retry) makes the pump disconnected.
    alive = [True]

    def responder(payload):
        if not alive[0]:
            return b""
        if payload == b"LF;bnf":
            return ACK + frame(b"1C;bAPPLIX;nSN1;f1.0")
        return ACK + frame(b"1C;d4E2" if payload.startswith(b"LE") else b"1C")

    line = FakeLine(responder=responder)
    pump = FKBasePump(line, config={"max_failures": 1})
    task = asyncio.create_task(pump.run())
    ident = await pump.connect()
    assert (ident.device_type, ident.serial, ident.firmware) == ("APPLIX", "SN1", "1.0")
    alive[0] = False
    st = base.PumpStatus()
    try:
        await pump.poll(st)
        raise AssertionError("poll answered by a silent pump")
    except base.PumpDisconnected as e:
        assert e.kind == base.COND_DISCONNECTED
    conds = [(e.code, e.values) for e in _link_events(pump)]
    assert conds == [
        (base.COND_TIMEOUT, {"cmd": b"LE"}),
        (base.COND_TIMEOUT, {"cmd": b"LE"}),
        (base.COND_DISCONNECTED, {"failures": 1}),
    ], conds
    alive[0] = True
    await pump.connect()
    conds = [(e.code, e.values) for e in _link_events(pump)]
    assert conds == [(base.COND_RECONNECTED, {"cause": base.COND_DISCONNECTED})], conds
    await pump.poll(st)
    assert st.rate == 1250
    assert pump.counters["timeout"] == 2 and pump.counters["reconnected"] == 1
    pump.close()
    task.cancel()


def test_frame_whose_end_was_lost_is_abandoned_after_the_gap():
    # The receive core takes the time of each read: no sleeping needed to test the gap rule.
    import time

    pump = FKBasePump(FakeLine())
    rx = pump._rx
    t0 = time.ticks_ms()
    part = memoryview(b"\x021E;a1")  # the rest of the frame never comes
    enq = memoryview(b"\x05")
    rx.feed(part, 0, len(part), t0)
    rx.feed(enq, 0, 1, time.ticks_add(t0, 1900))  # still inside the frame: a control byte
    assert bytes(rx.out[: rx.out_n]) == NAK + b"8"
    rx.out_n = 0
    rx.feed(part, 0, len(part), time.ticks_add(t0, 2000))
    rx.feed(enq, 0, 1, time.ticks_add(t0, 4001))  # 2 s of silence: the frame is dead
    assert bytes(rx.out[: rx.out_n]) == b"\x14"  # the ENQ is answered
    evs = [(e.code, e.values) for e in _link_events(pump)]
    assert evs == [
        (base.COND_CONTROL_IN_FRAME, {"err": ord("8"), "byte": 5}),
        (base.COND_NOISE, {"n": 6}),
    ], evs
