# Pump records: what the module reports, encoded as compact CBOR with SenML-style integer labels.
#
# A record is one CBOR map (RFC 8949, deterministic encoding) whose keys are small integers,
# in the spirit of SenML's CBOR labels (RFC 8428 §6: bt = -3 is the base time). Fields whose
# value the pump did not report are left out, so a record is typically 20-40 bytes.
#
#   label  name       type   meaning
#     0    kind       uint   KIND_* below
#     1    seq        uint   the record's sequence number (also sealed into its header)
#    -3    time       uint   module clock, seconds since 1970-01-01 UTC (SenML bt)
#     2    rate       uint   programmed rate, 0.1 ml/h           (pump var d)
#     3    volume     uint   volume delivered since reset, 0.001 ml (r)
#     4    dose       uint   dose target, 0.001 ml                (v)
#     5    remaining  uint   remaining time, minutes              (t)
#     6    alarms     uint   alarm bitmask                        (a)
#     7    state      uint   delivery state 0..6                  (u)
#     8    battery    uint   battery %                            (y)
#     9    power      uint   0 battery / 1 mains                  (z)
#    10    error      uint   technical error code                 (e)
#    11    mode       uint   1 manual / 2 remote                  (m)
#    12    flush_rate uint   0.1 ml/h                             (k)
#    13    flush_vol  uint   0.001 ml                             (s)
#    14    code       uint   link condition / module event code
#    15    detail     uint   a number that qualifies `code` (NAK error byte, count...)
#    16    text       tstr   identity: "type/serial/firmware"; log: the pump's log entry
#    17    index      uint   event-log index (KIND_LOG)
#    18    counters   map    health: {code: count}
#
# Kinds: a periodic or changed STATUS; a spontaneous PUMP_EVENT (alarm, state change: only the
# variables the pump sent); a pump LINK condition; the pump IDENTITY at each (re)connection; a
# pump event-LOG entry; a MODULE event (boot, storage overflow, secure-element failure, health).
#
# The encoder writes into one preallocated buffer: a record costs no heap. The returned
# memoryview aliases that buffer and is valid until the next record is encoded.
from micropython import const

from firmware.cbor import Encoder

KIND_STATUS = const(1)
KIND_PUMP_EVENT = const(2)
KIND_LINK = const(3)
KIND_IDENTITY = const(4)
KIND_LOG = const(5)
KIND_MODULE = const(6)
KIND_NAMES = {1: "status", 2: "pump_event", 3: "link", 4: "identity", 5: "log", 6: "module"}

# Module event codes (KIND_MODULE, label 14)
MOD_BOOT = const(1)
MOD_HEALTH = const(2)
MOD_RECORDS_LOST = const(3)  # detail = how many records could not be stored
MOD_SE_ERROR = const(4)
MOD_PUMP_DISCONNECTED = const(5)
MOD_PUMP_RECONNECTED = const(6)
MOD_VOLUME_RESET = const(7)  # the pump's volume counter went down: reset or power cycle
MOD_NAMES = {1: "boot", 2: "health", 3: "records_lost", 4: "se_error",
             5: "pump_disconnected", 6: "pump_reconnected", 7: "volume_reset"}

_L_KIND = const(0)
_L_SEQ = const(1)
_L_TIME = const(-3)
_L_CODE = const(14)
_L_DETAIL = const(15)
_L_TEXT = const(16)
_L_INDEX = const(17)
_L_COUNTERS = const(18)

# PumpStatus attribute -> label, in label order (deterministic CBOR wants sorted keys:
# 0, 1, 2.. < -3 in bytewise order of their encodings: 0x00.. 0x17 then 0x22).
STATUS_FIELDS = (
    ("rate", 2), ("volume", 3), ("dose", 4), ("remaining", 5), ("alarms", 6), ("state", 7),
    ("battery", 8), ("power", 9), ("error", 10), ("mode", 11), ("flush_rate", 12),
    ("flush_volume", 13),
)
# Pump variable letter (specs/pump-protocol.md) -> label, for spontaneous events; label order.
VAR_LABELS = (("d", 2), ("r", 3), ("v", 4), ("t", 5), ("a", 6), ("u", 7), ("y", 8), ("z", 9),
              ("e", 10), ("m", 11), ("k", 12), ("s", 13))

RECORD_MAX = const(160)  # an identity or log record with its text is the largest


class RecordEncoder:
    """Encodes records into one preallocated buffer; each method returns a memoryview of it."""

    def __init__(self, size=RECORD_MAX):
        self._enc = Encoder(bytearray(size))

    def _head(self, kind, seq, nfields):
        e = self._enc
        e.reset()
        e.map(nfields + 3)
        e.uint(_L_KIND)
        e.uint(kind)
        e.uint(_L_SEQ)
        e.uint(seq)
        return e

    def _tail(self, t):
        e = self._enc
        e.int(_L_TIME)
        e.uint(t)
        return e.view()

    def status(self, seq, t, st):
        n = 0
        for name, _ in STATUS_FIELDS:
            if getattr(st, name) >= 0:
                n += 1
        e = self._head(KIND_STATUS, seq, n)
        for name, label in STATUS_FIELDS:
            v = getattr(st, name)
            if v >= 0:
                e.uint(label)
                e.uint(v)
        return self._tail(t)

    def pump_event(self, seq, t, values):
        """values: {var letter: int} as the pump sent them; unknown letters are left out."""
        n = 0
        for letter, _ in VAR_LABELS:
            if letter in values:
                n += 1
        e = self._head(KIND_PUMP_EVENT, seq, n)
        for letter, label in VAR_LABELS:
            if letter in values:
                e.uint(label)
                e.uint(values[letter])
        return self._tail(t)

    def coded(self, seq, t, kind, code, detail=-1):
        """A LINK condition or a MODULE event: a code and an optional number."""
        e = self._head(kind, seq, 2 if detail >= 0 else 1)
        e.uint(_L_CODE)
        e.uint(code)
        if detail >= 0:
            e.uint(_L_DETAIL)
            e.uint(detail)
        return self._tail(t)

    def identity(self, seq, t, ident):
        e = self._head(KIND_IDENTITY, seq, 1)
        e.uint(_L_TEXT)
        e.text("%s/%s/%s" % (ident.device_type, ident.serial, ident.firmware))
        return self._tail(t)

    def log_entry(self, seq, t, index, text):
        e = self._head(KIND_LOG, seq, 2)
        e.uint(_L_TEXT)
        e.text(text)
        e.uint(_L_INDEX)
        e.uint(index)
        return self._tail(t)

    def health(self, seq, t, counters):
        """counters: {code: count}, only non-zero ones are written."""
        keys = sorted(k for k in counters if counters[k])
        e = self._head(KIND_MODULE, seq, 2)
        e.uint(_L_CODE)
        e.uint(MOD_HEALTH)
        e.uint(_L_COUNTERS)
        e.map(len(keys))
        for k in keys:
            e.uint(k)
            e.uint(counters[k])
        return self._tail(t)
