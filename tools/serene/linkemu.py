"""A userspace link emulator for LTE-M: an asyncio TCP proxy between the module and the broker.

    python -m serene.linkemu --target-port 1883 [--listen-port P] [--rtt-ms 150] [--jitter-ms 20]
        [--up-kbps 375] [--down-kbps 300] [--stall-every-s 60 --stall-s 2] [--stall-at T:D ...]

This machine's kernel has no `tc netem` (docs: TOOLCHAIN.md), so the cellular link is emulated
in userspace. Each direction of each TCP connection is a pipe:

    read from the sender (at most CHUNK bytes) -> wait out a stall -> token bucket (the link's
    bandwidth, bytes) -> one-way delay (rtt / 2 + jitter) -> write to the receiver

- Round trip: each chunk is held rtt_ms / 2 (+ uniform jitter in +-jitter_ms / 2) after it
  left the bucket, so a request and its answer see rtt_ms +- jitter_ms (default 150 +- 20). A chunk is never
  delivered before the one ahead of it in its stream (delivery time = max(its own, the
  previous one's)): jitter never reorders bytes within a TCP stream, as on a real link where
  TCP hands bytes to the application in order.
- Bandwidth: a token bucket per direction, shared by all connections (one radio), filled at
  up_bps / down_bps bits per second, `burst` bytes deep; burst 0 (the default) is a
  serialiser: each chunk holds the link n / rate seconds, idle or not. Defaults: 375 kbit/s up (3GPP TS 36.306 UE category M1, HD-FDD peak
  uplink), 300 kbit/s down (the category's HD-FDD downlink peak).
- A bounded buffer per pipe (buffer_bytes, default 64 KiB, a modem's queue): when it is full
  the proxy stops reading, so the sender's TCP sees backpressure as it would from a radio.
- Stalls: periods in which nothing leaves the bucket (either direction); bytes already in
  flight still arrive. Scheduled ones (stall_at: [(start_s, duration_s)] from start()),
  periodic ones (stall_every_s / stall_s: e.g. 2 s every 60 s, the first at stall_every_s),
  random ones (random_stall_per_s: a Poisson rate, random_stall_s: mean length, exponential,
  from a seeded generator), and a manual gate (hold() / release()).
- Counters (stats()): bytes and chunks each way, MQTT packets by type each way (the stream is
  split on MQTT 3.1.1 fixed headers; per-packet sizes let a caller add a TCP/IP overhead
  estimate), time at capacity (*_at_capacity_s: seconds the link spent sending, n / rate a
  chunk; *_queued_s: seconds chunks waited behind others), time stalled, connections.
- capacity_bytes(seconds): what the link can carry in `seconds` from start() (or from `t0`,
  seconds since start()), stalls deducted: the ceiling a drain is compared with.

The emulator runs its own asyncio loop in a thread, so synchronous benches and tests use it as
a context manager: `with LinkEmulator(broker_port) as emu: ... emu.port ...`.
"""

import argparse
import asyncio
import bisect
import collections
import math
import random
import threading
import time

#: Bytes read from a socket at once: about one IP packet over LTE-M (MTU 1500 less headers).
CHUNK = 1400
#: IPv4 (20) + TCP (20) + TCP timestamps option (12) per segment, and a segment's payload.
TCPIP_HEADER = 52
MSS = 1360

MQTT_TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
              7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
              12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT"}


def tcpip_overhead(packet_sizes, mss=MSS, header=TCPIP_HEADER):
    """Estimated TCP/IP header bytes for MQTT packets of these sizes, each sent in its own
    segment(s) (TCP_NODELAY with gathered writes, as the module does); pure TCP ACKs not
    counted."""
    return sum(header * max(1, math.ceil(n / mss)) for n in packet_sizes)


class MqttSplitter:
    """Splits one direction of an MQTT 3.1.1 stream into packets (fixed header, §2.2):
    counts them by type and keeps their sizes. Never changes a byte."""

    def __init__(self):
        self.buf = bytearray()
        self.by_type = collections.Counter()
        self.sizes = collections.Counter()  # type -> bytes
        self.count = 0
        self.bytes = 0
        self.publish_sizes = []  # every PUBLISH's whole size (header included)
        self.first_publish_at = None  # monotonic time of the first PUBLISH byte
        self.broken = False
        self._start = None

    def feed(self, data, now):
        if self.broken:
            return
        if not self.buf:
            self._start = now  # a packet starts with this data
        self.buf += data
        while True:
            b = self.buf
            if len(b) < 2:
                return
            n, mult, i = 0, 1, 1
            while True:
                if i >= len(b):
                    return
                c = b[i]
                n += (c & 0x7F) * mult
                mult <<= 7
                i += 1
                if not c & 0x80:
                    break
                if i > 4:
                    self.broken = True  # not MQTT: stop splitting, keep forwarding
                    return
            total = i + n
            if len(b) < total:
                return
            kind = MQTT_TYPES.get(b[0] >> 4, "type%d" % (b[0] >> 4))
            self.by_type[kind] += 1
            self.sizes[kind] += total
            self.count += 1
            self.bytes += total
            if kind == "PUBLISH":
                self.publish_sizes.append(total)
                if self.first_publish_at is None:
                    self.first_publish_at = self._start
            del self.buf[:total]
            self._start = now


class _Bucket:
    """The bandwidth of one direction: a token bucket on bytes, filled at rate bytes/s and
    `burst` bytes deep. burst = 0 (the default): a serialiser, each chunk holds the link for
    n / rate seconds even after an idle spell (a 1,000-byte packet takes 21 ms at 375 kbit/s
    however long the radio was quiet), as a radio's air interface does."""

    def __init__(self, rate_bps, burst):
        self.rate = rate_bps / 8.0 if rate_bps else 0.0  # bytes per second; 0 = unlimited
        self.burst = burst
        self.tokens = float(burst)
        self.t = time.monotonic()
        self.free_at = 0.0  # serialiser: when the link has finished the bytes it took
        self.busy_s = 0.0  # time at capacity: seconds the link spent sending (n / rate)
        self.queued_s = 0.0  # seconds chunks waited behind others (the link was the bottleneck)
        self.lock = asyncio.Lock()

    async def take(self, n, emu):
        await emu._wait_stall()
        if not self.rate:
            return
        async with self.lock:  # one radio: connections queue for it in turn
            if not self.burst:
                now = time.monotonic()
                start = max(now, self.free_at)
                self.queued_s += start - now
                self.busy_s += n / self.rate
                self.free_at = start + n / self.rate
                await asyncio.sleep(self.free_at - now)
                return
            left = n
            while left > 0:
                await emu._wait_stall()
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
                self.t = now
                k = min(left, self.burst)
                if self.tokens >= k:
                    self.tokens -= k
                    left -= k
                    self.busy_s += k / self.rate
                    continue
                wait = (k - self.tokens) / self.rate
                self.queued_s += wait
                await asyncio.sleep(wait)


class LinkEmulator:
    def __init__(self, target_port, target_host="127.0.0.1", listen_port=0,
                 listen_host="127.0.0.1", rtt_ms=150.0, jitter_ms=20.0, up_bps=375_000,
                 down_bps=300_000, burst=0, buffer_bytes=65536, stall_at=(),
                 stall_every_s=0.0, stall_s=0.0, random_stall_per_s=0.0, random_stall_s=2.0,
                 seed=1, mqtt=True):
        """up_bps / down_bps: bits per second, 0 = unlimited. rtt_ms: the round trip the link
        adds (both one-way delays); jitter_ms: the round trip's spread
        (+-jitter_ms: +-jitter_ms / 2 each way)."""
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.rtt_ms = rtt_ms
        self.jitter_ms = jitter_ms
        self.up_bps = up_bps
        self.down_bps = down_bps
        self.burst = burst
        self.buffer_bytes = buffer_bytes
        self.stall_at = sorted((float(a), float(d)) for a, d in stall_at)
        self.stall_every_s = stall_every_s
        self.stall_s = stall_s
        self.random_stall_per_s = random_stall_per_s
        self.random_stall_s = random_stall_s
        self.mqtt = mqtt
        self._rng = random.Random(seed)
        self._jrng = random.Random(seed + 1)
        self._random_stalls = []  # [(start, end)] drawn ahead, from start()
        self._random_horizon = 0.0
        self._held = False
        self._hold_since = None
        self._manual = []  # [(start, end)] of manual holds, from start()
        self.t0 = None
        self.wall_t0 = None
        self.port = None
        self.loop = None
        self._thread = None
        self._server = None
        self._ready = threading.Event()
        self._error = None
        self._conns = set()
        self.counters = {"up_bytes": 0, "down_bytes": 0, "up_chunks": 0, "down_chunks": 0,
                         "connections": 0, "connect_failures": 0}
        self.split = {"up": MqttSplitter(), "down": MqttSplitter()}
        self._buckets = None

    # ---------------------------------------------------------------- lifecycle

    def start(self):
        self._thread = threading.Thread(target=self._run, name="linkemu", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("link emulator did not start")
        if self._error:
            raise self._error
        return self

    def _run(self):
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._serve())
        except Exception as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self):
        self._buckets = {"up": _Bucket(self.up_bps, self.burst),
                         "down": _Bucket(self.down_bps, self.burst)}
        self._stop_ev = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        self.t0 = time.monotonic()
        self.wall_t0 = time.time()  # the same instant on the wall clock (server timestamps)
        self._ready.set()
        await self._stop_ev.wait()
        self._server.close()
        for w in list(self._conns):
            w.close()
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    def stop(self):
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop_ev.set)
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- stalls

    def hold(self):
        """Stall the link now, until release() (a manual gate: nothing leaves either way)."""
        self._held = True
        self._hold_since = self._now()

    def release(self):
        if self._held:
            self._manual.append((self._hold_since, self._now()))
        self._held = False

    def _now(self):
        return time.monotonic() - self.t0

    def _draw_random(self, until):
        while self._random_horizon < until and self.random_stall_per_s > 0:
            gap = self._rng.expovariate(self.random_stall_per_s)
            start = self._random_horizon + gap
            dur = self._rng.expovariate(1.0 / self.random_stall_s)
            self._random_stalls.append((start, start + dur))
            self._random_horizon = start + dur

    def stall_periods(self, until):
        """[(start, end)] of scheduled, periodic and random stalls up to `until` s (manual
        holds included once released; a current one up to now), merged, sorted."""
        out = [(a, a + d) for a, d in self.stall_at if a < until]
        if self.stall_every_s > 0 and self.stall_s > 0:
            k = 1
            while k * self.stall_every_s < until:
                a = k * self.stall_every_s
                out.append((a, a + self.stall_s))
                k += 1
        self._draw_random(until)
        out += [p for p in self._random_stalls if p[0] < until]
        out += self._manual
        if self._held:
            out.append((self._hold_since, max(self._hold_since, self._now())))
        out.sort()
        merged = []
        for a, b in out:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def stalled_s(self, t_from, t_to):
        """Seconds of stall within [t_from, t_to] (seconds since start())."""
        s = 0.0
        for a, b in self.stall_periods(t_to):
            s += max(0.0, min(b, t_to) - max(a, t_from))
        return s

    def _stall_end(self, t):
        """If t (s since start) is in a stall, when it ends (None for a manual hold)."""
        if self._held:
            return None
        periods = self.stall_periods(t + 1.0)
        i = bisect.bisect_right(periods, (t, float("inf"))) - 1
        if i >= 0 and periods[i][0] <= t < periods[i][1]:
            return periods[i][1]
        return False

    async def _wait_stall(self):
        while True:
            end = self._stall_end(self._now())
            if end is False:
                return
            await asyncio.sleep(0.01 if end is None else max(0.001, end - self._now()))

    # ---------------------------------------------------------------- capacity

    def capacity_bytes(self, seconds, t0=0.0, direction="up"):
        """Bytes the link can carry in `seconds` from t0 (s since start()) in `direction`
        ("up" or "down"), stalls deducted; at the IP level (headers included)."""
        bps = self.up_bps if direction == "up" else self.down_bps
        if not bps:
            return float("inf")
        return bps / 8.0 * max(0.0, seconds - self.stalled_s(t0, t0 + seconds))

    def stats(self):
        """Counters so far (a snapshot; safe from any thread)."""
        now = self._now() if self.t0 is not None else 0.0
        out = dict(self.counters)
        out["elapsed_s"] = now
        out["stalled_s"] = self.stalled_s(0.0, now)
        if self._buckets:
            for d in ("up", "down"):
                out["%s_at_capacity_s" % d] = self._buckets[d].busy_s
                out["%s_queued_s" % d] = self._buckets[d].queued_s
        for d, sp in self.split.items():
            out["%s_mqtt_packets" % d] = dict(sp.by_type)
            out["%s_mqtt_bytes" % d] = dict(sp.sizes)
            out["%s_tcpip_overhead_est" % d] = tcpip_overhead(self._sizes(sp))
        return out

    @staticmethod
    def _sizes(sp):
        # Non-PUBLISH packets: their average size per type is enough for the estimate.
        sizes = list(sp.publish_sizes)
        for kind, n in sp.by_type.items():
            if kind != "PUBLISH" and n:
                sizes += [sp.sizes[kind] // n] * n
        return sizes

    def first_publish_s(self, direction="up"):
        t = self.split[direction].first_publish_at
        return None if t is None else t - self.t0

    # ---------------------------------------------------------------- the proxy

    async def _accept(self, creader, cwriter):
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            self.counters["connect_failures"] += 1
            cwriter.close()
            return
        self.counters["connections"] += 1
        self._conns.update((cwriter, swriter))
        try:
            await asyncio.gather(self._pipe(creader, swriter, "up"),
                                 self._pipe(sreader, cwriter, "down"))
        finally:
            for w in (cwriter, swriter):
                self._conns.discard(w)
                w.close()

    def _one_way_s(self):
        half = self.jitter_ms / 2.0
        j = self._jrng.uniform(-half, half) if half else 0.0
        return max(0.0, (self.rtt_ms / 2.0 + j) / 1000.0)

    async def _pipe(self, reader, writer, d):
        bucket = self._buckets[d]
        q = collections.deque()  # (deliver_at, data)
        queued = [0]
        wake = asyncio.Event()
        room = asyncio.Event()
        room.set()
        done = [False]
        last_at = [0.0]

        async def deliver():
            while True:
                while not q:
                    if done[0]:
                        return
                    wake.clear()
                    await wake.wait()
                at, data = q[0]
                dt = at - time.monotonic()
                if dt > 0:
                    await asyncio.sleep(dt)
                q.popleft()
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError):
                    return
                queued[0] -= len(data)
                if queued[0] < self.buffer_bytes:
                    room.set()

        task = asyncio.ensure_future(deliver())
        try:
            while True:
                await room.wait()
                try:
                    data = await reader.read(CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    break
                await bucket.take(len(data), self)
                now = time.monotonic()
                at = max(now + self._one_way_s(), last_at[0])  # never overtakes
                last_at[0] = at
                self.counters[d + "_bytes"] += len(data)
                self.counters[d + "_chunks"] += 1
                if self.mqtt:
                    self.split[d].feed(data, now)
                q.append((at, data))
                queued[0] += len(data)
                if queued[0] >= self.buffer_bytes:
                    room.clear()
                wake.set()
        finally:
            done[0] = True
            wake.set()
            try:
                await task
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                try:
                    if writer.can_write_eof():
                        writer.write_eof()
                except (OSError, RuntimeError):
                    pass


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m serene.linkemu", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--target-host", default="127.0.0.1")
    ap.add_argument("--target-port", type=int, required=True, help="the broker's port")
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--rtt-ms", type=float, default=150.0)
    ap.add_argument("--jitter-ms", type=float, default=20.0)
    ap.add_argument("--up-kbps", type=float, default=375.0)
    ap.add_argument("--down-kbps", type=float, default=300.0)
    ap.add_argument("--stall-every-s", type=float, default=0.0)
    ap.add_argument("--stall-s", type=float, default=0.0)
    ap.add_argument("--stall-at", action="append", default=[], metavar="START:DURATION")
    ap.add_argument("--random-stall-per-s", type=float, default=0.0)
    ap.add_argument("--random-stall-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    emu = LinkEmulator(a.target_port, a.target_host, a.listen_port, rtt_ms=a.rtt_ms,
                       jitter_ms=a.jitter_ms, up_bps=int(a.up_kbps * 1000),
                       down_bps=int(a.down_kbps * 1000),
                       stall_at=[tuple(map(float, s.split(":"))) for s in a.stall_at],
                       stall_every_s=a.stall_every_s, stall_s=a.stall_s,
                       random_stall_per_s=a.random_stall_per_s, random_stall_s=a.random_stall_s,
                       seed=a.seed).start()
    print("linkemu: 127.0.0.1:%d -> %s:%d, rtt %g ms (spread +-%g), up %g kbit/s, down %g kbit/s"
          % (emu.port, a.target_host, a.target_port, a.rtt_ms, a.jitter_ms, a.up_kbps,
             a.down_kbps), flush=True)
    try:
        while True:
            time.sleep(10)
            s = emu.stats()
            print("linkemu: up %d B, down %d B, %d connections, stalled %.1f s, at capacity "
                  "up %.1f s" % (s["up_bytes"], s["down_bytes"], s["connections"],
                                 s["stalled_s"], s["up_at_capacity_s"]), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
