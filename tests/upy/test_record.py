# Records: exact bytes on the wire (RFC 8949 encoding worked by hand from the label table in
# firmware/record.py), and no heap used per record once the encoder exists.
from binascii import unhexlify

from firmware import record


class Status:
    def __init__(self, **kw):
        for name, _ in record.STATUS_FIELDS:
            setattr(self, name, -1)
        for k, v in kw.items():
            setattr(self, k, v)


class Ident:
    device_type = "APPLIX"
    serial = "S1"
    firmware = "2.1"


def test_status_record_exact_bytes():
    enc = record.RecordEncoder()
    st = Status(rate=1250, volume=100000, alarms=0, state=2)
    got = bytes(enc.status(5, 1700000000, st))
    # A7 map(7) | 00 01 kind=1 | 01 05 seq=5 | 02 19 04E2 rate=1250 | 03 1A 000186A0 volume
    # | 06 00 alarms=0 | 07 02 state=2 | 22 1A 6553F100 time (-3 -> 0x22)
    want = unhexlify("a700010105021904e2031a000186a00600070222" "1a6553f100")
    if got != want:
        raise AssertionError(got.hex())


def test_pump_event_keeps_only_sent_variables_in_label_order():
    enc = record.RecordEncoder()
    got = bytes(enc.pump_event(9, 1, {"u": 6, "a": 1, "q": 7}))
    # A5 | 00 02 kind | 01 09 seq | 06 01 alarms | 07 06 state | 22 01 time ('q' is unknown)
    if got != unhexlify("a500020109060107062201"):
        raise AssertionError(got.hex())


def test_link_condition_and_module_event():
    enc = record.RecordEncoder()
    got = bytes(enc.coded(3, 2, record.KIND_LINK, 4, 0x32))
    # A5 | 00 03 kind | 01 03 seq | 0E 04 code | 0F 18 32 detail=0x32 | 22 02 time
    if got != unhexlify("a5000301030e040f18322202"):
        raise AssertionError(got.hex())
    got = bytes(enc.coded(1, 2, record.KIND_MODULE, record.MOD_BOOT))
    # A4 | 00 06 | 01 01 | 0E 01 boot | 22 02  (no detail)
    if got != unhexlify("a4000601010e012202"):
        raise AssertionError(got.hex())


def test_identity_text():
    enc = record.RecordEncoder()
    got = bytes(enc.identity(1, 2, Ident()))
    # A4 | 00 04 | 01 01 | 10 6D "APPLIX/S1/2.1" | 22 02
    want = unhexlify("a4000401011" "06d" "4150504c49582f53312f322e31" "2202")
    if got != want:
        raise AssertionError(got.hex())


def test_encoding_a_record_allocates_only_its_view():
    # The record is written into the encoder's preallocated buffer; the only allocation is the
    # memoryview handed to the sink (one small object: 4 machine words on this port).
    import gc

    enc = record.RecordEncoder()
    st = Status(rate=1250, volume=100000, alarms=0, state=2, battery=80, power=1)
    enc.status(1, 1700000000, st)  # warm up
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        for seq in range(2, 102):
            enc.status(seq, 1700000000 + seq, st)
        per_record = (gc.mem_alloc() - before) / 100
    finally:
        gc.enable()
    if per_record > 32:
        raise AssertionError("%d bytes allocated per record" % per_record)
