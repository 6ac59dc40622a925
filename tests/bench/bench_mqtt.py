# MQTT uplink benchmark: umqtt.simple on the MicroPython unix port against a private Mosquitto
# on loopback, messages/s for N payloads of sealed sizes. The baseline the link layer's drain
# rate is compared against is "umqtt.simple QoS 1 + TCP_NODELAY".
#
#   .venv/bin/python tests/bench/bench_mqtt.py [N] [--json FILE]
#
# Under CPython it starts the broker (serene.broker) and a server-side subscriber that counts
# and checks every message, then runs itself under MicroPython (firmware/ and drivers/ as
# .mpy, 64 KiB heap) once per variant; under MicroPython (`bench_mqtt.py VARIANT ...`) it
# publishes ROUNDS x N messages and prints one "RESULT {json}" line (median round). Variants:
#   umqtt-qos1-nagle     umqtt.simple as shipped: its connect(), QoS 1, Nagle on (N capped at
#                        100: each publish waits ~40 ms for the delayed ACK)
#   umqtt-qos1-nodelay   umqtt.simple, QoS 1, client.sock.setsockopt(IPPROTO_TCP, TCP_NODELAY)
#                        = THE BASELINE
#   umqtt-qos0-nodelay   umqtt.simple, QoS 0 (no PUBACK wait): the socket's own ceiling
#   ltem                 drivers/radio/ltem.py LtemRadio.send(): QoS 1, writes gathered into one
#                        segment, TCP_NODELAY, through asyncio (what the link layer calls)
#   ltem-nagle           the same with TCP_NODELAY off: gathering alone avoids the Nagle stall
#   ltem-tls             LtemRadio over TLS 1.2 with the broker certificate pinned
# Payload sizes: 60 B (one sealed record, 40 B of CBOR + 13 B of protection + frame header)
# and 1024 B (a full LTE-M frame, the radio's MTU).
# Loopback has no radio: these are the software's costs, the upper bound a real LTE-M link
# (100-600 ms round trips) never reaches; they say how much of a round trip the module spends.
import sys

VARIANTS = ("umqtt-qos1-nagle", "umqtt-qos1-nodelay", "umqtt-qos0-nodelay", "ltem",
            "ltem-nagle", "ltem-tls")
SIZES = (60, 1024)
DEVICE = "bench-1"
ROUNDS = 3

if sys.implementation.name != "micropython":
    import json
    import pathlib
    import tempfile
    import threading

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
    from serene import upy
    from serene.broker import Broker, Probe

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n_default = int(args[0]) if args else 2000
    json_out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None

    class Counter:
        """Server side: counts messages and checks each is the payload the bench sends."""

        def __init__(self, probe):
            self.probe = probe
            self.got = 0
            self.bad = 0
            self.expect = None
            self.lock = threading.Lock()
            probe.client.on_message = self._on

        def _on(self, client, userdata, msg):
            with self.lock:
                self.got += 1
                if msg.payload != self.expect:
                    self.bad += 1

        def reset(self, expect):
            with self.lock:
                self.got, self.bad, self.expect = 0, 0, expect

    def payload(size):
        return bytes((i * 7 + 3) & 0xFF for i in range(size))

    results = []
    rc = 0
    with tempfile.TemporaryDirectory() as d:
        code = upy.compile_tree(pathlib.Path(d) / "mpy")
        upy.compile_file(__file__, code / "bench_mqtt.mpy")
        with Broker(pathlib.Path(d) / "home", [DEVICE], tls=True, plain=True) as brk:
            creds = brk.credentials(DEVICE)
            srv = brk.server_credentials()
            probe = Probe(brk.server_port, srv["username"], srv["password"])
            probe.subscribe("serene/+/up", qos=1)
            counter = Counter(probe)
            for variant in VARIANTS:
                for size in SIZES:
                    n = min(n_default, 100) if variant.endswith("nagle") and \
                        variant.startswith("umqtt") else n_default
                    counter.reset(payload(size))
                    port = brk.tls_port if variant == "ltem-tls" else brk.port
                    argv = ["bench", variant, str(port), creds["username"], creds["password"],
                            str(n), str(size), str(brk.cert_der)]
                    boot = "import sys\nsys.argv[:] = %r\nimport bench_mqtt\n" % (argv,)
                    res = upy.run(["-c", boot], heap="64K", code_dir=code, cwd=code,
                                  timeout=600)
                    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
                    if res.returncode != 0 or not line:
                        sys.stdout.write(res.stdout + res.stderr)
                        rc = 1
                        continue
                    r = json.loads(line[0][7:])
                    # QoS 0 is not waited for: give the broker a moment to deliver the tail.
                    total = r["n"] * r["rounds"]
                    for _ in range(500):
                        if counter.got >= total:
                            break
                        threading.Event().wait(0.02)
                    r.update(variant=variant, size=size, server_received=counter.got,
                             server_corrupt=counter.bad)
                    results.append(r)
                    print("%-20s %5d B  %6d msgs x %d  %8.0f msg/s  %8.1f us/msg (median)  "
                          "server got %d/%d (%d corrupt)%s"
                          % (variant, size, r["n"], r["rounds"], r["msg_per_s"],
                             r["us_per_msg"], counter.got, total, counter.bad,
                             "  longest block %d ms, heap: code %d B, connected radio %d B"
                             % (r["block_max_ms"], r["heap_code"], r["heap_connected"])
                             if "block_max_ms" in r else ""))
                    if counter.got != total or counter.bad:
                        rc = 1
            probe.close()
    if json_out:
        pathlib.Path(json_out).write_text(json.dumps(results, indent=2) + "\n")
    sys.exit(rc)

# --- under MicroPython ---------------------------------------------------------------------
import asyncio
import gc
import json
import time

from umqtt.simple import MQTTClient

variant, port, user, password, n, size, cert = sys.argv[1:8]
port, n, size = int(port), int(n), int(size)
topic = ("serene/%s/up" % DEVICE).encode()
data = bytes((i * 7 + 3) & 0xFF for i in range(size))


def report(times_us, extra=None):
    # The median of ROUNDS rounds of n messages each (one round is noisy on a shared machine).
    t_us = sorted(times_us)[len(times_us) // 2]
    r = {"n": n, "rounds": len(times_us), "seconds": t_us / 1e6, "msg_per_s": n * 1e6 / t_us,
         "us_per_msg": t_us / n, "rounds_us": times_us}
    if extra:
        r.update(extra)
    print("RESULT " + json.dumps(r))


def bench_umqtt():
    c = MQTTClient(DEVICE, "127.0.0.1", port, user, password, keepalive=60)
    c.connect()
    if "nodelay" in variant:
        c.sock.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY (TOOLCHAIN.md)
    qos = 0 if "qos0" in variant else 1
    times = []
    for _ in range(ROUNDS):
        t0 = time.ticks_us()
        for _ in range(n):
            c.publish(topic, data, False, qos)
        times.append(time.ticks_diff(time.ticks_us(), t0))
    c.disconnect()
    report(times)


async def bench_ltem():
    gc.collect()
    h0 = gc.mem_alloc()
    from drivers.radio.ltem import LtemRadio

    gc.collect()
    h1 = gc.mem_alloc()
    kw = {"nodelay": variant != "ltem-nagle"}
    if variant == "ltem-tls":
        with open(cert, "rb") as f:
            kw["tls_pin"] = f.read()
    radio = LtemRadio(DEVICE, "127.0.0.1", port, user, password, **kw)
    task = asyncio.create_task(radio.run())
    for _ in range(500):
        if radio.is_up():
            break
        await asyncio.sleep_ms(10)
    gc.collect()
    h2 = gc.mem_alloc()
    times = []
    for _ in range(ROUNDS):
        t0 = time.ticks_us()
        for _ in range(n):
            await radio.send(data)
        times.append(time.ticks_diff(time.ticks_us(), t0))
    task.cancel()
    await asyncio.sleep_ms(10)
    report(times, {"block_max_ms": radio.stats["block_max_ms"],
                "send_failures": radio.stats["send_failures"],
                # heap in use (gc.mem_alloc after gc.collect): the driver's .mpy code loaded in
                # RAM (0 when frozen), and the connected radio (socket wrapper, write buffer,
                # umqtt client, queues, tasks; TLS: the mbedTLS session)
                "heap_code": h1 - h0, "heap_connected": h2 - h1})


if variant.startswith("umqtt"):
    bench_umqtt()
else:
    asyncio.run(bench_ltem())
