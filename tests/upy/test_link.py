# Link layer (firmware/link.py) on the unix port: frames checked byte for byte against
# docs/link-format.md, and delivery through fake radios on a virtual clock (loss, duplication,
# reordering, outages, failover, duty cycle), with a fake server that reassembles and acks and
# a fake ack opener (MAC + replay counter). The frame parser used here (link_sim.parse) is
# written from the format document, not from the firmware.
import os

from firmware.link import Cum2Acks, Link, LinkError
from firmware.outbox import Outbox
from link_sim import (
    AskingServer,
    AsyncRadio,
    LoraSimRadio,
    FakeOpener,
    FakeServer,
    Rng,
    Sim,
    SimRadio,
    enc,
    parse,
    seal_ack,
)
from outbox_util import obj, rmtree, tmpdir

CFG = {"capacity_bytes": 256 * 1024, "segment_bytes": 2048, "max_data": 1024}


def make_outbox(root, epochs=((5, 80),)):
    """An outbox holding, per (epoch, count): the epoch record (600 B, seq 0), then records,
    with a checkpoint every 10th seq. Returns (outbox, {id: (kind, bytes)}, ids in log order)."""
    ob = Outbox(root, **CFG)
    ob.recover()
    want = {}
    order = []
    for epoch, count in epochs:
        for seq in range(count):
            kind = 0 if seq == 0 else (2 if seq % 10 == 0 else 1)
            data = obj(kind, epoch, seq)
            ob.append(kind, epoch, seq, data)
            want[(epoch, seq)] = (kind, data)
            order.append((epoch, seq))
    return ob, want, order


def check_delivered(server, want, ob):
    if server.delivered != want:
        missing = [k for k in want if k not in server.delivered]
        extra = [k for k in server.delivered if k not in want]
        raise AssertionError("missing %r extra %r" % (missing[:5], extra[:5]))
    if ob.next_entry(0) is not None:
        raise AssertionError("outbox not empty at the end")


def test_frame_bytes_exact():
    d = tmpdir("ln")
    try:
        ob = Outbox(d + "/ob", **CFG)
        ob.recover()
        a = bytes(range(1, 11))
        b = bytes(range(0x11, 0x1D))
        c = bytes(range(40))
        ob.append(1, 5, 1, a)
        ob.append(1, 5, 2, b)
        ob.append(2, 5, 300, c)
        sim = Sim()
        radio = SimRadio("lora", 51, sim)
        link = Link(ob, radio, FakeOpener())
        f1 = bytes(link.build_frame(radio, 0))
        f2 = bytes(link.build_frame(radio, 0))
        # the example of docs/link-format.md
        want1 = b"\x10\x05" + b"\x01\x01\x0a" + a + b"\x01\x02\x0c" + b
        want2 = b"\x10\x05" + b"\x02\xac\x02\x28" + c
        if f1 != want1 or len(f1) != 30:
            raise AssertionError(f1)
        if f2 != want2 or len(f2) != 46:
            raise AssertionError(f2)
        if link.build_frame(radio, 0) is not None:
            raise AssertionError("a frame with nothing to send")
        # at MTU 242 all three share one frame
        ob2, sim = Outbox(d + "/ob", **CFG), Sim()
        ob2.recover()
        big = SimRadio("lte", 242, sim)
        f = bytes(Link(ob2, big, FakeOpener()).build_frame(big, 0))
        if f != want1 + want2[2:]:
            raise AssertionError(f)
    finally:
        rmtree(d)


def test_epoch_record_fragments_at_mtu_51():
    d = tmpdir("ln")
    try:
        ob = Outbox(d + "/ob", **CFG)
        ob.recover()
        rec = obj(0, 5, 0)
        ob.append(0, 5, 0, rec)
        ob.append(1, 5, 1, obj(1, 5, 1))
        sim = Sim()
        radio = SimRadio("lora", 51, sim)
        link = Link(ob, radio, FakeOpener())
        frames = []
        while True:
            f = link.build_frame(radio, 0)
            if f is None:
                break
            frames.append(bytes(f))
        # per the document: 43, 43, 43 bytes, then 42 from offset 128 on; 15 frames for 600 B
        if frames[0][:8] != b"\x10\x05\x80\x00\xd8\x04\x00\x2b" or frames[0][8:] != rec[:43]:
            raise AssertionError(frames[0][:10])
        if frames[1][:8] != b"\x10\x05\x80\x00\xd8\x04\x2b\x2b" or frames[1][8:] != rec[43:86]:
            raise AssertionError(frames[1][:10])
        got = bytearray(600)
        nfrag = 0
        for fr in frames:
            if len(fr) > 51:
                raise AssertionError(len(fr))
            epoch, entries = parse(fr)
            for kind, seq, frag, total, offset, data in entries:
                if seq == 0:
                    nfrag += 1
                    got[offset : offset + len(data)] = data
        if nfrag != 15 or bytes(got) != rec:
            raise AssertionError(nfrag)
        # the record after it rides in the last fragment's frame (9 bytes of it left room)
        last = parse(frames[-1])[1]
        if [e[1] for e in last] != [0, 1] or len(frames) != 15:
            raise AssertionError((last, len(frames)))
    finally:
        rmtree(d)


def deliver(mtu, seed, loss, dup, spread, limit_ms=600000):
    d = tmpdir("ln")
    try:
        ob, want, order = make_outbox(d + "/ob", ((5, 120), (6, 30)))
        sim = Sim(seed, loss=loss, dup=dup, spread_ms=spread)
        radio = SimRadio("r", mtu, sim, base_ms=5)
        server = FakeServer(mtu)
        link = Link(ob, radio, FakeOpener(), window=16, rto_ms=300, rto_max_ms=5000)
        ok = sim.run(
            link, server, limit_ms, lambda: link.in_flight() == 0 and ob.next_entry(0) is None
        )
        if not ok:
            raise AssertionError("not done: %d of %d" % (len(server.delivered), len(want)))
        check_delivered(server, want, ob)
        if link.stats["lost_in_outbox"] or link.stats["send_errors"]:
            raise AssertionError(link.stats)
        # first completions follow log order wherever nothing was lost (the epoch record of
        # each epoch completes before any record of it is retransmitted)
        first_tx = {}
        for t, fr in radio.tx:
            epoch, entries = parse(fr)
            for e in entries:
                first_tx.setdefault((epoch, e[1]), len(first_tx))
        if sorted(first_tx, key=lambda k: first_tx[k]) != order:
            raise AssertionError("first transmissions out of log order")
        return link, server, sim
    finally:
        rmtree(d)


def test_lossy_mtu_51_everything_once_identical_copies():
    link, server, sim = deliver(51, 7, 0.3, 0.1, 200)
    if link.stats["retransmissions"] == 0 or max(server.copies.values()) < 2:
        raise AssertionError(link.stats)
    if link.stats["fragments"] == 0:
        raise AssertionError("no fragmentation at MTU 51")


def test_lossy_mtu_242_everything_once_identical_copies():
    link, server, sim = deliver(242, 11, 0.25, 0.15, 300)
    if link.stats["retransmissions"] == 0:
        raise AssertionError(link.stats)


def test_outage_and_failover_keep_identity():
    d = tmpdir("ln")
    try:
        ob, want, _ = make_outbox(d + "/ob", ((8, 60),))
        sim = Sim(3, loss=0.1, spread_ms=50)
        # LTE-M preferred, down for a while; LoRa (MTU 51, 1 % duty cycle) takes over
        lte = SimRadio("lte", 242, sim, base_ms=2, outages=((200, 60000), (90000, 120000)))
        lora = SimRadio("lora", 51, sim, duty_cycle=0.01, base_ms=40, per_byte_us=1600)
        server = FakeServer(242)
        link = Link(ob, [lte, lora], FakeOpener(), window=16, rto_ms=500, rto_max_ms=8000)
        ok = sim.run(
            link, server, 900000, lambda: ob.next_entry(0) is None and link.in_flight() == 0
        )
        if not ok:
            raise AssertionError((len(server.delivered), link.stats))
        check_delivered(server, want, ob)
        if not lora.tx or not lte.tx or link.stats["failovers"] < 2:
            raise AssertionError((len(lora.tx), len(lte.tx), link.stats))
        for t, fr in lte.tx:
            for a, b in lte.outages:
                if a <= t < b:
                    raise AssertionError("sent on a radio that was down at %d" % t)
        for t, fr in lora.tx:
            if len(fr) > 51:
                raise AssertionError(len(fr))
    finally:
        rmtree(d)


def test_duty_cycle_one_percent_respected():
    d = tmpdir("ln")
    try:
        ob, want, _ = make_outbox(d + "/ob", ((2, 25),))
        sim = Sim(5)
        lora = SimRadio("lora", 51, sim, duty_cycle=0.01, base_ms=40, per_byte_us=1600)
        server = FakeServer(51)
        link = Link(ob, lora, FakeOpener(), rto_ms=20000, rto_max_ms=120000)
        ok = sim.run(link, server, 10 * 3600 * 1000, lambda: ob.next_entry(0) is None)
        if not ok:
            raise AssertionError(link.stats)
        check_delivered(server, want, ob)
        tx = lora.tx
        for k in range(1, len(tx)):
            toa = lora.time_on_air_ms(len(tx[k - 1][1]))
            if tx[k][0] - tx[k - 1][0] < toa * 100:
                gap = tx[k][0] - tx[k - 1][0]
                raise AssertionError("frame %d after %d ms, ToA %d" % (k, gap, toa))
        air = sum(lora.time_on_air_ms(len(f)) for _, f in tx)
        span = tx[-1][0] - tx[0][0] + lora.time_on_air_ms(len(tx[-1][1]))
        if air * 100 > span + air * 100 // len(tx):  # 1 %, up to the last frame's off-time
            raise AssertionError((air, span))
    finally:
        rmtree(d)


def test_backoff_bounded_jittered_and_resends_identical_bytes():
    d = tmpdir("ln")
    try:
        ob = Outbox(d + "/ob", **CFG)
        ob.recover()
        data = obj(1, 4, 0)
        ob.append(1, 4, 0, data)
        sim = Sim(9)
        sim.blackhole = True  # the radio says up, nothing arrives
        radio = SimRadio("r", 242, sim)
        link = Link(ob, radio, FakeOpener(), rto_ms=100, rto_max_ms=3000)
        sim.run(link, FakeServer(), 60000)
        times = [t for t, _ in radio.tx]
        frames = set(f for _, f in radio.tx)
        if len(frames) != 1 or parse(list(frames)[0])[1][0][5] != data:
            raise AssertionError("retransmissions differ")
        gaps = [times[k] - times[k - 1] for k in range(1, len(times))]
        for k, g in enumerate(gaps):
            nominal = min(3000, 100 << k)
            if not (nominal * 3 // 4 - 2 <= g <= nominal + 2):
                raise AssertionError("gap %d: %d ms, nominal %d" % (k, g, nominal))
        if max(gaps) > 3000 + 2 or len(gaps) < 20:
            raise AssertionError(gaps)
        if len(set(gaps[6:])) < 3:
            raise AssertionError("no jitter: %r" % gaps[6:])
        if link.stats["retransmissions"] != len(times) - 1:
            raise AssertionError(link.stats)
    finally:
        rmtree(d)


def test_forged_replayed_and_garbage_downlinks_change_nothing():
    d = tmpdir("ln")
    try:
        ob, want, _ = make_outbox(d + "/ob", ((3, 10),))
        sim = Sim()
        radio = SimRadio("r", 242, sim)
        opener = FakeOpener()
        link = Link(ob, radio, opener)
        while link.build_frame(radio, 0) is not None:
            pass
        genuine = seal_ack(5, 3, 3, 0, 0)
        if not link.on_downlink(genuine):
            raise AssertionError("genuine ack refused")
        state = open(d + "/ob/state", "rb").read()
        before = [(e.epoch, e.seq) for e in ob.pending()]
        evil = [
            genuine,  # replayed
            seal_ack(4, 3, 9, 0, 0),  # older counter: replayed
            seal_ack(9, 3, 9, 0, 0, key=b"attacker-key-000"),  # forged MAC
            genuine[:-1] + bytes([genuine[-1] ^ 1]),  # tampered tag
            b"",
            b"K",
            b"\x00" * 300,  # oversize
            b"exec(open('x').read())",  # not an ack: never anything but opener input
        ]
        for p in evil:
            if link.on_downlink(p):
                raise AssertionError("accepted %r" % p[:8])
        if [(e.epoch, e.seq) for e in ob.pending()] != before or before[0] != (3, 4):
            raise AssertionError(before[:2])
        if open(d + "/ob/state", "rb").read() != state:
            raise AssertionError("state changed")
        st = link.stats
        if st["acks"] != 1 or st["acks_rejected"] != 6 or st["downlink_dropped"] != 2:
            raise AssertionError(st)
    finally:
        rmtree(d)


def test_resume_after_reboot_from_outbox():
    d = tmpdir("ln")
    try:
        ob, want, _ = make_outbox(d + "/ob", ((1, 70),))
        sim = Sim(21, loss=0.2, spread_ms=100)
        radio = SimRadio("r", 51, sim, base_ms=5)
        server = FakeServer(51)
        opener = FakeOpener()
        link = Link(ob, radio, opener, window=8, rto_ms=300, rto_max_ms=3000)
        sim.run(link, server, 100000, lambda: len(server.delivered) >= 30)
        ob.close()
        # reboot: RAM gone; a new outbox from flash, a new link, a new epoch appended
        committed = Outbox(d + "/ob", **CFG)
        committed.recover()
        acked_before = [k for k in want if committed.is_acked(k[0], k[1])]
        if len(acked_before) < 10:
            raise AssertionError(len(acked_before))
        for seq in range(5):
            kind = 0 if seq == 0 else 1
            committed.append(kind, 2, seq, obj(kind, 2, seq))
            want[(2, seq)] = (kind, obj(kind, 2, seq))
        copies_before = dict(server.copies)
        sim2 = Sim(22, loss=0.2, spread_ms=100)
        sim2.t = sim.t
        radio2 = SimRadio("r", 51, sim2, base_ms=5)
        link2 = Link(committed, radio2, opener, window=8, rto_ms=300, rto_max_ms=3000)
        ok = sim2.run(link2, server, sim.t + 600000,
                      lambda: committed.next_entry(0) is None and link2.in_flight() == 0)
        if not ok:
            raise AssertionError((len(server.delivered), len(want)))
        check_delivered(server, want, committed)
        # what the outbox had durably acked before the reboot was not sent again
        for k in acked_before:
            if server.copies[k] != copies_before[k]:
                raise AssertionError("%r resent after reboot" % (k,))
    finally:
        rmtree(d)


def test_config_errors_are_named():
    d = tmpdir("ln")
    try:
        ob = Outbox(d + "/ob", **CFG)
        ob.recover()
        sim = Sim()
        for kw in ({"window": 0}, {"rto_ms": 0}, {"rto_ms": 100, "rto_max_ms": 50}):
            try:
                Link(ob, SimRadio("r", 51, sim), FakeOpener(), **kw)
                raise AssertionError("accepted %r" % kw)
            except LinkError as e:
                if e.reason != "config":
                    raise
        ob.append(1, 1, 0, b"x" * 30)
        tiny = SimRadio("r", 11, sim)  # US915 DR0: not supported
        try:
            Link(ob, tiny, FakeOpener()).build_frame(tiny, 0)
            raise AssertionError("11-byte MTU accepted")
        except LinkError as e:
            if e.reason != "mtu":
                raise
    finally:
        rmtree(d)


async def test_run_loop_delivers_over_asyncio():
    import asyncio

    d = tmpdir("ln")
    try:
        ob, want, _ = make_outbox(d + "/ob", ((7, 40),))
        server = FakeServer(51)
        radio = AsyncRadio("a", 51, server, Rng(4), loss=0.2)
        link = Link(ob, radio, FakeOpener(), window=8, rto_ms=30, rto_max_ms=200, poll_ms=10)
        task = asyncio.create_task(link.run())
        for _ in range(1000):
            if ob.next_entry(0) is None and link.in_flight() == 0:
                break
            await asyncio.sleep_ms(10)
        task.cancel()
        check_delivered(server, want, ob)
        if link.stats["retransmissions"] == 0:
            raise AssertionError(link.stats)
    finally:
        rmtree(d)


def test_cum2_adapter_maps_bit_i_to_cum_plus_2_plus_i():
    class ThreeTuple:
        def __init__(self, result):
            self.result = result

        def open(self, payload):
            if payload != b"ok":
                raise ValueError("forged")
            return self.result

    d = tmpdir("ln")
    try:
        ob, want, _ = make_outbox(d + "/ob", ((6, 12),))
        # cum 2; bits 0 and 3 -> seqs 4 and 7 (seq 3 = cum + 1 missing by definition)
        link = Link(ob, SimRadio("r", 242, Sim()), Cum2Acks(ThreeTuple((6, 2, 0b1001))))
        if link.on_downlink(b"no") or not link.on_downlink(b"ok"):
            raise AssertionError(link.stats)
        got = [e.seq for e in ob.pending()]
        if got != [3, 5, 6, 8, 9, 10, 11]:
            raise AssertionError(got)
    finally:
        rmtree(d)


async def test_run_loop_survives_foreign_radio_errors_without_budget():
    import asyncio

    class Boom(Exception):  # a driver's own error type, not an OSError
        pass

    class Flaky:  # a radio that is not a drivers.radio.base.Radio: no `budget`
        name = "flaky"
        mtu = 51

        def __init__(self, server):
            self.server = server
            self.calls = 0
            self.inbox = []

        def is_up(self):
            return True

        def time_on_air_ms(self, n):
            return 0

        async def send(self, frame):
            self.calls += 1
            if self.calls % 3 == 0:
                raise Boom("send", self.calls)
            if self.calls % 7 == 0:
                await asyncio.sleep_ms(20000)  # hangs: the link's send deadline must fire
            self.inbox.append(self.server.receive(frame))

        async def recv(self, timeout_ms):
            if self.calls % 5 == 0:
                raise Boom("recv")
            await asyncio.sleep_ms(min(timeout_ms, 2))
            return self.inbox.pop(0) if self.inbox else None

    d = tmpdir("ln")
    try:
        ob, want, _ = make_outbox(d + "/ob", ((9, 15),))
        server = FakeServer(51)
        radio = Flaky(server)
        link = Link(
            ob, radio, FakeOpener(), window=8, rto_ms=30, rto_max_ms=200, poll_ms=10,
            send_timeout_ms=50,
        )
        task = asyncio.create_task(link.run())
        for _ in range(1000):
            if ob.next_entry(0) is None and link.in_flight() == 0:
                break
            await asyncio.sleep_ms(10)
        task.cancel()
        check_delivered(server, want, ob)
        if link.stats["send_errors"] < 2 or link.stats["recv_errors"] < 1:
            raise AssertionError(link.stats)
        if not isinstance(link.last_error, Exception):
            raise AssertionError(link.last_error)
    finally:
        rmtree(d)


def test_announced_epoch_record_goes_first_even_with_a_full_window():
    # After a reboot the new epoch's record sits behind the backlog in the outbox; the
    # server can seal acks with the new key only once it has it (firmware/delivery.py).
    d = tmpdir("ln")
    try:
        ob = Outbox(d + "/ob", **CFG)
        ob.recover()
        for seq in range(1, 41):
            ob.append(1, 4, seq, obj(1, 4, seq))
        pos = ob.append(0, 5, 0, obj(0, 5, 0))
        ob.append(1, 5, 1, obj(1, 5, 1))
        sim = Sim()
        radio = SimRadio("lte", 242, sim)
        link = Link(ob, radio, FakeOpener(), window=4, rto_ms=60_000, rto_max_ms=60_000)
        sent = []
        for t in range(3):  # the window fills with backlog; nothing is acked
            f = link.build_frame(radio, t)
            if f is not None:
                sent += [(parse(bytes(f))[0], e[1]) for e in parse(bytes(f))[1]]
        if link.in_flight() != 4 or (5, 0) in sent:
            raise AssertionError((link.in_flight(), sent))
        if link.build_frame(radio, 3) is not None:
            raise AssertionError("a full window sent more backlog")
        link.announce(pos)
        if link.wakeup_ms(radio, 4) != 0:
            raise AssertionError("an announced record must go at once")
        epoch, entries = parse(bytes(link.build_frame(radio, 4)))
        if epoch != 5 or [(e[0], e[1]) for e in entries] != [(0, 0)]:
            raise AssertionError((epoch, entries))
        if link.in_flight() != 5:  # the reserved slot
            raise AssertionError(link.in_flight())
    finally:
        rmtree(d)


# ---- LoRa: acks asked for (class A), MTU following the DR, coalescing, urgency ----------


def lora_deliver(seed, loss, mtus, limit_ms=3_600_000, window=16):
    """Epoch 5 (record + 120 objects) and 6 (30) over a LoRa-like radio whose MTU steps
    through `mtus` [(from_ms, mtu)] (ADR), 1 % duty cycle, to a server that acks only when
    asked. Returns (link, server, radio, want, ob)."""
    d = tmpdir("ll")
    try:
        ob, want, order = make_outbox(d + "/ob", ((5, 120), (6, 30)))
        sim = Sim(seed, loss=loss, delay_ms=400)
        radio = LoraSimRadio("lora", mtus[0][1], sim, duty_cycle=0.01, base_ms=40,
                             per_byte_us=1600)
        server = AskingServer()
        link = Link(ob, radio, FakeOpener(), window=window, rto_ms=1000, rto_max_ms=600_000)
        sizes = []

        def done():
            for at, m in mtus:
                if sim.t >= at:
                    radio.mtu = m
            while len(sizes) < len(radio.tx):
                t, fr = radio.tx[len(sizes)]
                sizes.append(len(fr))
            return link.in_flight() == 0 and ob.next_entry(0) is None

        if not sim.run(link, server, limit_ms, done):
            raise AssertionError("not done: %d of %d %r" % (len(server.delivered), len(want),
                                                            link.stats))
        check_delivered(server, want, ob)
        return link, server, radio, want, ob
    finally:
        rmtree(d)


def test_lora_acks_only_when_asked_half_window_and_end_of_burst():
    link, server, radio, want, ob = lora_deliver(11, 0.1, [(0, 222)])
    asks = [fr for t, fr in radio.tx if fr[0] & 1]
    if len(asks) != link.stats["ack_requests"] or server.asked == 0:
        raise AssertionError((len(asks), link.stats))
    # Only reserved bits clear; every frame header is 0x10 or 0x11.
    for t, fr in radio.tx:
        if fr[0] not in (0x10, 0x11):
            raise AssertionError(fr[0])
    # New objects per ask: half a window (8) at least, save end-of-burst and retransmissions.
    n = len(want)
    if server.acks_sent > n // 8 + link.stats["retransmissions"] + 4:
        raise AssertionError("too many acks: %d for %d objects %r" % (server.acks_sent, n,
                                                                      link.stats))


def test_lora_lossless_asks_once_per_half_window():
    link, server, radio, want, ob = lora_deliver(3, 0.0, [(0, 222)], window=16)
    if link.stats["retransmissions"]:
        raise AssertionError(link.stats)
    # 151 objects, an ask every 8 objects sent (or at a burst's end)
    if not len(want) // 8 - 2 <= server.acks_sent <= len(want) // 8 + 4:
        raise AssertionError((server.acks_sent, len(want)))


def test_lora_mtu_follows_the_radio_between_frames():
    # ADR: DR5 (222) -> DR0 (51) -> DR3 (115) -> DR5 while the backlog goes out.
    link, server, radio, want, ob = lora_deliver(5, 0.1, [(0, 222), (60_000, 51),
                                                          (400_000, 115), (900_000, 222)])
    seen = set(len(fr) > 115 for t, fr in radio.tx)
    if link.stats["mtu_changes"] < 3 or seen != {True, False}:
        raise AssertionError(link.stats)
    # the Sim checks every frame against the radio's MTU at its time (AssertionError)


def test_lora_rto_after_an_asking_frame_from_the_radio():
    d = tmpdir("ll")
    try:
        ob = Outbox(d + "/ob", **CFG)
        ob.recover()
        for seq in range(1, 4):
            ob.append(1, 5, seq, obj(1, 5, seq))
        sim = Sim()
        radio = LoraSimRadio("lora", 222, sim, rto_ms=3000, base_ms=50)
        link = Link(ob, radio, FakeOpener(), window=16, rto_ms=100, rto_max_ms=600_000)
        f = bytes(link.build_frame(radio, 0))
        if not f[0] & 1:
            raise AssertionError("the end of a burst asks for an ack")
        # the deadline is the radio's (time on air + windows), not rto_ms: no resend before
        w = link.wakeup_ms(radio, 1)
        if link.build_frame(radio, 2000) is not None:
            raise AssertionError("resent before the radio's ack timeout")
        f2 = link.build_frame(radio, 4000)
        if f2 is None or not f2[0] & 1 or link.stats["retransmissions"] != 3:
            raise AssertionError((w, link.stats))
    finally:
        rmtree(d)


def test_lora_coalescing_waits_but_never_for_an_alarm():
    d = tmpdir("ll")
    try:
        ob = Outbox(d + "/ob", **CFG)
        ob.recover()
        sim = Sim()
        radio = LoraSimRadio("lora", 222, sim)
        link = Link(ob, radio, FakeOpener(), window=16, rto_ms=1000, rto_max_ms=600_000,
                    coalesce_ms=5000)
        ob.append(1, 5, 1, obj(1, 5, 1))
        if link.build_frame(radio, 0) is not None:
            raise AssertionError("a lone small record must wait to be coalesced")
        # the loop listens meanwhile (poll_ms at most), then exactly until the delay is up
        if link.wakeup_ms(radio, 1000) != link.poll_ms or link.wakeup_ms(radio, 4900) != 100:
            raise AssertionError((link.wakeup_ms(radio, 1000), link.wakeup_ms(radio, 4900)))
        ob.append(1, 5, 2, obj(1, 5, 2))
        if link.build_frame(radio, 4999) is not None:
            raise AssertionError("sent before the coalescing delay")
        epoch, entries = parse(bytes(link.build_frame(radio, 5000)))
        if [e[1] for e in entries] != [1, 2]:
            raise AssertionError(entries)
        # Enough to fill a frame: at once.
        for seq in range(3, 10):
            ob.append(1, 5, seq, obj(1, 5, seq))
        f = link.build_frame(radio, 5001)
        if f is None or len(parse(bytes(f))[1]) < 4:
            raise AssertionError("a full frame must not wait")
        rest = link.build_frame(radio, 5002)  # what was left: too little, it waits
        if rest is not None and len(parse(bytes(rest))[1]) < 1:
            raise AssertionError(rest)
        # An alarm: no wait, and it goes first.
        ob.append(1, 5, 20, obj(1, 5, 20))
        pos = ob.append(1, 5, 21, obj(1, 5, 21))
        link.urgent(pos)
        if link.wakeup_ms(radio, 5003) != 0:
            raise AssertionError("an alarm waits")
        epoch, entries = parse(bytes(link.build_frame(radio, 5003)))
        if entries[0][1] != 21:
            raise AssertionError("the alarm does not go first: %r" % ([e[1] for e in entries],))
        if link.stats["urgent"] != 1 or link.stats["coalesced_waits"] < 2:
            raise AssertionError(link.stats)
    finally:
        rmtree(d)


def test_lora_steady_state_asks_at_checkpoints_and_half_window_not_every_burst():
    d = tmpdir("ll")
    try:
        ob = Outbox(d + "/ob", **CFG)
        ob.recover()
        sim = Sim()
        radio = LoraSimRadio("lora", 222, sim)
        link = Link(ob, radio, FakeOpener(), window=32, rto_ms=1000, rto_max_ms=600_000,
                    ask_delay_ms=300_000)
        server = AskingServer()
        asks = 0
        t = 0
        ob.append(0, 5, 0, obj(0, 5, 0, 100))
        for seq in range(1, 41):  # a record every 10 s, each burst one frame
            ob.append(2 if seq % 16 == 0 else 1, 5, seq, obj(1, 5, seq))
            f = bytes(link.build_frame(radio, t))
            asks += f[0] & 1
            ack = server.receive(f)  # acks only what asks, in the frame's windows
            if ack is not None:
                link.on_downlink(ack)
            t += 10_000
        if link.stats["retransmissions"]:
            raise AssertionError(link.stats)
        # half a window (objects 0-15), the checkpoints 16 and 32: three asks for 41 objects,
        # no end-of-burst ask (every burst younger than 5 min)
        if asks != 3 or link.stats["ack_requests"] != 3 or server.asked != 3:
            raise AssertionError((asks, link.stats))
        # Nothing more comes: the objects not covered go again, asking, after 2 x the delay.
        if link.build_frame(radio, t + 100_000) is not None:
            raise AssertionError("resent early")
        f = link.build_frame(radio, t + 600_000)
        if f is None or not f[0] & 1:
            raise AssertionError("the tail was never asked for")
    finally:
        rmtree(d)
