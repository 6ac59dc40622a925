# Test helper (MicroPython): the STSAFE driver against the emulator behind the I2C bridge.
#   micropython stsafe_scenarios.py PORT MAC_HEX CIPHER_HEX SCENARIO [ARGS...]
# Prints one JSON line with what happened; tests/test_stsafe_driver.py checks it against the
# spec and against `cryptography`. A second bridge device at 0x7E (emulator.FaultPort) lets
# the script inject faults at the right moment.
import asyncio
import binascii
import json
import sys
import time

from drivers.stsafe import STSAFE, errors
from drivers.unix.i2c_bridge import SocketI2C

FAULT_PORT = 0x7E


def unhex(s):
    return binascii.unhexlify(s) if s and s != "-" else None


def hexs(b):
    return binascii.hexlify(b).decode()


def bus(port):
    i2c = SocketI2C("127.0.0.1", port)
    # TCP_NODELAY (IPPROTO_TCP 6, option 1): SocketI2C writes header and data separately,
    # which Nagle + delayed ACK turn into ~40 ms per write on loopback.
    return i2c


def fault(i2c, **kw):
    i2c.writeto(FAULT_PORT, json.dumps(kw).encode())


def chip_counter(i2c):
    i2c.writeto(FAULT_PORT, b'{"get": "counter"}')
    return json.loads(i2c.readfrom(FAULT_PORT, 64).decode().strip())["counter"]


def name(e):
    return type(e).__name__


async def expect_error(coro):
    try:
        await coro
    except errors.SEError as e:
        return name(e)
    return "no error"


async def roundtrip(se, i2c, peer, digest, pub0):
    r = {}
    pd = await se.init()
    r["mask"] = hexs(pd["mask_id"])
    r["echo"] = (await se.echo(b"serene")).decode()
    rnd = await se.random(300)
    r["random"] = hexs(rnd)
    r["life_cycle"] = await se.query_life_cycle()
    r["host_key_slot"] = list(await se.query_host_key_slot())
    r["zones"] = [list(z) for z in await se.query_data_partition()]
    r["auth"] = sorted(
        [k, v[0], v[1]] for k, v in (await se.query_command_authorization())[1].items()
    )
    r["keys"] = [list(k) for k in await se.query_private_key_table()]
    data = bytes(i & 0xFF for i in range(300))
    await se.update(1, 5, data)
    r["read"] = hexs(await se.read(1, 5, 300))
    await se.update(3, 10, data[:150], atomic=True)
    r["read_atomic"] = hexs(await se.read(3, 10, 150))
    r["dec"] = [await se.decrement(5), await se.decrement(5, 3, data=b"epoch", offset=2)]
    r["counter"] = await se.read_counter(5)
    r["counter_data"] = hexs(await se.read(5, 0, 8))
    eph = await se.generate_key(0xFF)
    r["eph"] = hexs(eph)
    r["z"] = hexs(await se.establish_key(0xFF, peer))
    r["eph_reuse"] = await expect_error(se.establish_key(0xFF, peer))
    sig = await se.generate_signature(0, digest)
    r["sig"] = hexs(sig)
    r["cert"] = hexs(await se.read_certificate(0))
    r["verify_ok"] = await se.verify_signature(pub0, sig, digest)
    bad = bytearray(sig)
    bad[5] ^= 0x40
    r["verify_bad"] = await se.verify_signature(pub0, bytes(bad), digest)
    r["verify_other_digest"] = await se.verify_signature(pub0, sig, bytes(32)[:31] + b"\x01")
    r["locked_cert_zone"] = await expect_error(se.update(0, 0, b"\x00"))
    r["repair"] = await expect_error(se.put_host_keys(bytes(16), bytes(16)))
    r["zero_digest"] = await expect_error(se.generate_signature(0, bytes(32)))
    await se.hibernate(1)
    r["after_hibernate"] = (await se.echo(b"awake")).decode()
    await se.reset()
    r["n_driver"] = se.counter
    r["n_chip"] = chip_counter(i2c)
    return r


async def counter_exhaust(se, i2c, zone):
    await se.init()
    values = [await se.read_counter(zone)]
    while True:
        try:
            values.append(await se.decrement(zone))
        except errors.SEError as e:
            err = name(e)
            break
        if len(values) > 10:
            err = "never exhausted"
            break
    return {
        "values": values,
        "error": err,
        "after": await se.read_counter(zone),
        "zero_amount": await expect_error(se.decrement(zone, 0)),
        "n_driver": se.counter,
        "n_chip": chip_counter(i2c),
    }


async def faults(se, i2c, bound_ms):
    r = {}
    await se.init()
    # 1. The chip NACKs for ever: a clear error once the command's bound has passed.
    fault(i2c, fault="stuck_busy")
    t0 = time.ticks_ms()
    r["stuck"] = await expect_error(se.echo(b"x"))
    r["stuck_ms"] = time.ticks_diff(time.ticks_ms(), t0)
    i2c.writeto(FAULT_PORT, b'{"do": "clear"}')
    r["after_stuck"] = (await se.echo(b"ok1")).decode()
    # 2. A NACK storm shorter than the bound is ridden out.
    fault(i2c, fault="nack_storm", count=20)
    r["storm"] = (await se.echo(b"ok2")).decode()
    # 3. One corrupted response CRC: re-read, success. Many: CRCError.
    fault(i2c, fault="corrupt_crc", count=1, cmd=0)
    r["crc_once"] = (await se.echo(b"ok3")).decode()
    fault(i2c, fault="corrupt_crc", count=10, cmd=0)
    r["crc_many"] = await expect_error(se.echo(b"x"))
    i2c.writeto(FAULT_PORT, b'{"do": "clear"}')
    r["after_crc"] = (await se.echo(b"ok4")).decode()
    # 4. A forged R-MAC (valid CRC) is rejected.
    fault(i2c, fault="corrupt_rmac", count=1, cmd=0)
    r["rmac"] = await expect_error(se.echo(b"x"))
    r["after_rmac"] = (await se.echo(b"ok5")).decode()
    # 5. A lost response: the chip counted the command, the driver re-queries N.
    fault(i2c, fault="drop_response", count=1, cmd=0)
    r["dropped"] = await expect_error(se.echo(b"x"))
    r["after_drop"] = (await se.echo(b"ok6")).decode()
    # 6. N moved on behind the driver's back: 0x16, re-query, one re-send.
    fault(i2c, fault="counter_step", count=1)
    r["after_step"] = (await se.echo(b"ok7")).decode()
    r["resyncs"] = se.resyncs
    # 7. A chip status is raised, not retried; 0x01 (corrupted command) is re-sent once.
    fault(i2c, fault="status", code=0x05, cmd=0)
    r["status5"] = await expect_error(se.echo(b"x"))
    fault(i2c, fault="status", code=0x01, cmd=0)
    r["status1"] = (await se.echo(b"ok8")).decode()
    r["n_driver"] = se.counter
    r["n_chip"] = chip_counter(i2c)
    return r


async def ticker(se, i2c, peer, digest):
    """Chip busy for its real processing times (time_scale 1): another task keeps running."""
    await se.init()
    ticks = [0]
    gaps = [0]
    running = [True]

    async def tick():
        last = time.ticks_ms()
        while running[0]:
            await asyncio.sleep_ms(1)
            now = time.ticks_ms()
            gaps[0] = max(gaps[0], time.ticks_diff(now, last))
            last = now
            ticks[0] += 1

    t = asyncio.create_task(tick())
    t0 = time.ticks_ms()
    await se.generate_key(0xFF)
    await se.establish_key(0xFF, peer)
    await se.generate_signature(0, digest)
    elapsed = time.ticks_diff(time.ticks_ms(), t0)
    running[0] = False
    await t
    return {"ticks": ticks[0], "max_gap_ms": gaps[0], "elapsed_ms": elapsed}


async def encrypted(se, i2c, peer):
    """Commands and responses encrypted as the chip's authorization table says."""
    await se.init()
    data = bytes(range(100, 200))
    await se.update(1, 0, data)
    eph = await se.generate_key(0xFF)
    return {
        "echo": hexs(await se.echo(b"secret echo " * 4)),
        "read": hexs(await se.read(1, 0, 100)),
        "eph": hexs(eph),
        "z": hexs(await se.establish_key(0xFF, peer)),
        "n_driver": se.counter,
        "n_chip": chip_counter(i2c),
    }


async def envelope(se, i2c, slot, data):
    """Wrap and Unwrap Local Envelope through the driver; argument checks and chip errors."""
    await se.init()
    r = {"table": sorted([k, v] for k, v in (await se.query_local_envelope_keys()).items())}
    env = await se.wrap(slot, data)
    r["envelope"] = hexs(env)
    r["unwrapped"] = hexs(await se.unwrap(slot, env))
    blob = bytes(range(32))  # an ack key (16) + ack common IV (13), zero-padded to 32
    r["blob_roundtrip"] = (await se.unwrap(slot, await se.wrap(slot, blob))) == blob
    big = bytes(i & 0xFF for i in range(480))
    big_env = await se.wrap(slot, big)
    r["big"] = [len(big_env), (await se.unwrap(slot, big_env)) == big]
    sent = chip_counter(i2c)
    bad_lengths = []  # (no await in a comprehension on MicroPython)
    for n in (0, 8, 15, 17, 488):
        bad_lengths.append(await expect_error(se.wrap(slot, bytes(n))))
    for n in (16, 23, 25, 496):
        bad_lengths.append(await expect_error(se.unwrap(slot, bytes(n))))
    r["bad_lengths"] = bad_lengths
    r["nothing_sent"] = chip_counter(i2c) == sent
    bad = bytearray(env)
    bad[3] ^= 0x01
    r["altered"] = await expect_error(se.unwrap(slot, bytes(bad)))
    r["empty_slot"] = await expect_error(se.unwrap(1, env))
    await se.echo(b"resync")  # after a chip error N is re-queried before the next command
    r["n_driver"] = se.counter
    r["n_chip"] = chip_counter(i2c)
    return r


async def init_only(se, i2c):
    try:
        await se.init()
    except errors.SEError as e:
        return {"error": name(e), "detail": repr(e.detail)}
    return {"error": None}


async def no_keys(se, i2c):
    await se.init()
    return {
        "generate_key": await expect_error(se.generate_key(0xFF)),
        "echo": (await se.echo(b"plain")).decode(),
        "sig": await expect_error(se.generate_signature(0, b"\x02" * 32)),
    }


async def _attempt(coro):
    try:
        v = await coro
    except errors.SEError as e:
        return name(e), None
    return "ok", v


async def _key_commands(se, peer):
    """Every command that uses a private key, an envelope key or a counter, once each."""
    r = {}
    for what, fn in (
        ("generate_key_1", lambda: se.generate_key(1)),
        ("generate_key_ff", lambda: se.generate_key(0xFF)),
        ("establish_key", lambda: se.establish_key(0xFF, peer)),
        ("generate_signature", lambda: se.generate_signature(0, b"\x01" * 32)),
        ("decrement", lambda: se.decrement(5)),
        ("wrap", lambda: se.wrap(0, bytes(range(16)))),
    ):
        r[what], v = await _attempt(fn())
        if what == "wrap":
            env = v if v is not None else bytes(24)
    r["unwrap"], v = await _attempt(se.unwrap(0, env))
    r["unwrapped"] = hexs(v) if v is not None else None
    return r


async def oracle(se, i2c, peer):
    """A bus client that asks the chip to sign, agree a key, count, wrap or unwrap. Without
    host keys it sends the plain commands (no init: the driver then does not know the chip's
    table and refuses nothing itself), and again with guessed host keys; with the module's
    keys, as the firmware does."""
    if se.keys is not None:
        await se.init()
        return {"paired": await _key_commands(se, peer)}
    r = {"plain": await _key_commands(se, peer)}
    guess = STSAFE(i2c, host_mac_key=bytes(16), host_cipher_key=bytes(16))
    await guess.init()
    r["guessed_keys"] = await _key_commands(guess, peer)
    return r


SCENARIOS = {
    "roundtrip": (roundtrip, lambda a: (unhex(a[0]), unhex(a[1]), unhex(a[2]))),
    "counter_exhaust": (counter_exhaust, lambda a: (int(a[0]),)),
    "faults": (faults, lambda a: (int(a[0]),)),
    "ticker": (ticker, lambda a: (unhex(a[0]), unhex(a[1]))),
    "encrypted": (encrypted, lambda a: (unhex(a[0]),)),
    "envelope": (envelope, lambda a: (int(a[0]), unhex(a[1]))),
    "init_only": (init_only, lambda a: ()),
    "no_keys": (no_keys, lambda a: ()),
    "oracle": (oracle, lambda a: (unhex(a[0]),)),
}


def main():
    port, mac, cipher, scenario = (
        int(sys.argv[1]),
        unhex(sys.argv[2]),
        unhex(sys.argv[3]),
        sys.argv[4],
    )
    fn, parse = SCENARIOS[scenario]
    args = parse(sys.argv[5:])
    i2c = bus(port)
    kw = {}
    if scenario == "faults":
        kw["busy_timeout_ms"] = args[0]
    se = STSAFE(i2c, host_mac_key=mac, host_cipher_key=cipher, **kw)
    print(json.dumps(asyncio.run(fn(se, i2c, *args))))


main()
