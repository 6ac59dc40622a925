# Garbage from the bus never escapes the STSAFE driver as anything but a named SEError:
# random response frames (with a valid CRC, so they pass the frame layer and reach the
# parsers) and random corruptions of good frames, for every parsing command. MicroPython.
import asyncio
import os

import drivers.stsafe.commands as _c
from drivers.stsafe import STSAFE, errors
from stsafe_fake import FakeI2C, rsp

_c.WAIT_MS = (0,) * len(_c.WAIT_MS)  # the fake answers at once: no chip processing time

PEER = b"\x04" + bytes(range(1, 65))


def _calls():
    return (
        lambda se: se.query_product_data(),
        lambda se: se.query_host_key_slot(),
        lambda se: se.query_life_cycle(),
        lambda se: se.query_i2c_parameters(),
        lambda se: se.query_data_partition(),
        lambda se: se.query_command_authorization(),
        lambda se: se.query_private_key_table(),
        lambda se: se.echo(b"abc"),
        lambda se: se.random(40),
        lambda se: se.read(1, 0, 10),
        lambda se: se.read_certificate(0),
        lambda se: se.decrement(5),
        lambda se: se.generate_key(1),
        lambda se: se.generate_signature(0, b"\x01" * 32),
        lambda se: se.verify_signature(PEER, bytes(64), b"\x01" * 32),
        lambda se: se.establish_key(0xFF, PEER),
        lambda se: se.query_local_envelope_keys(),
        lambda se: se.wrap(0, bytes(16)),
        lambda se: se.unwrap(0, bytes(24)),
    )


def _one(call, answers):
    se = STSAFE(FakeI2C(answers), busy_timeout_ms=5)

    async def go():
        try:
            await call(se)
        except errors.SEError:
            pass

    asyncio.run(go())


def _rand(n):
    return os.urandom(n)


def test_random_valid_crc_frames_raise_only_se_errors():
    for call in _calls():
        for i in range(60):
            n = _rand(1)[0] % 80 if i % 3 else _rand(1)[0] % 8
            status = 0 if i % 4 else _rand(1)[0]
            data = _rand(n)
            if i % 5 == 0 and n > 2:
                data = bytes([0, n - 2]) + data[2:]  # plausible LV lengths
            _one(call, [rsp(status, data)] * 4)


def test_corrupted_frames_raise_only_se_errors():
    good = rsp(0, b"\x30\x82\x00\x10" + bytes(16))
    for call in _calls():
        for _ in range(40):
            f = bytearray(good)
            for _ in range(1 + _rand(1)[0] % 3):
                f[_rand(1)[0] % len(f)] = _rand(1)[0]
            cut = _rand(1)[0] % (len(f) + 1)
            _one(call, [bytes(f[: max(cut, 1)])] * 4)
