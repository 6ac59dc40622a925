# Store and forward, wired from the config: the secure element, the outbox, the sealing sink,
# the radio and the link layer. The application (firmware/app.py) gives records to `sink`
# and runs `tasks()` beside its own.
#
#   records -> SealingSink (firmware/sealing.py) -> Outbox (flash) -> Link -> radio
#   acks    <- radio <- Link.on_downlink -> epoch acks opener (firmware/ack.py) -> Outbox cursor
import asyncio
from micropython import const

from drivers.stsafe.errors import SEError
from firmware import health as H
from firmware import log
from firmware.epoch import EpochError
from firmware.link import Cum2Acks, Link
from firmware.outbox import Outbox
from firmware.sealing import SealingSink

_log = log.Logger("delivery")

# What a failed epoch start or rotation raises: the epoch steps (EpochError), the secure
# element's other commands (certificate, pinned key: SEError), the bus (OSError), bad data.
SE_FAILURES = (EpochError, SEError, OSError, ValueError)

# Epoch start needs the secure element: Decrement 15 ms + Generate Key 160 ms + Establish
# Key 260 ms + Generate Signature 80 ms of chip time (specs/stsafe-a110.md §1 table) plus the
# bus; a failed start is retried after 1 s doubling to 60 s.
_START_RETRY_MIN_MS = const(1000)
_START_RETRY_MAX_MS = const(60_000)


class RotationAcks:
    """Opens acks with the new epoch's key, or with the previous epoch's while the server
    still seals with it (it has not yet verified the new epoch record). The first ack that
    opens with the new key retires the old one. An ack tried on both and refused by both
    raises the new opener's error (counted by both: firmware/ack.py counts per opener)."""

    def __init__(self, new, old):
        self.new = new
        self.old = old

    def open(self, payload):
        try:
            out = self.new.open(payload)
        except ValueError as e:
            if self.old is None:
                raise
            try:
                return self.old.open(payload)
            except ValueError:
                raise e
        self.old = None
        return out


class Delivery:
    def __init__(self, cfg, ident, se, radio, health, data_dir):
        self.cfg = cfg
        self.se = se
        self.radio = radio
        self.health = health
        self.outbox = Outbox(data_dir + "/outbox", cfg["outbox_capacity"],
                             segment_bytes=cfg["outbox_segment"])
        rep = self.outbox.recover()
        first_boot = rep.get("state") == "missing" and not rep.get("segments")
        if rep.get("torn_bytes") or rep.get("corrupt_regions") or not (
                rep.get("state") == "ok" or first_boot):
            _log.warn("outbox recovered: %s", rep)
        else:
            _log.info("outbox: %d pending objects", rep.get("pending", 0))
        self.sink = SealingSink(se, ident, self.outbox, health, data_dir,
                                cfg["checkpoint_every_n"], cfg["checkpoint_every_s"] * 1000)
        self.link = None

    async def start(self):
        """Secure element up, new epoch stored; then the link can run. Retries forever with
        backoff: without an epoch no record can be sealed, and nothing else can replace it."""
        backoff = _START_RETRY_MIN_MS
        while True:
            try:
                await self.se.init()
                ep = await self.sink.start()
                break
            except SE_FAILURES as e:
                self.health.count(H.SE_ERRORS)
                _log.error("epoch start failed: %s %s; retry in %d ms", type(e).__name__, e,
                           backoff)
                await asyncio.sleep_ms(backoff)
                backoff = min(backoff * 2, _START_RETRY_MAX_MS)
        self.link = Link(self.outbox, [self.radio], Cum2Acks(ep.acks),
                         window=self.cfg["link_window"])
        self._announce()
        return ep

    def _announce(self):
        if self.sink.epoch_pos >= 0:
            self.link.announce(self.sink.epoch_pos)

    async def rotate(self):
        """A new epoch (firmware/sealing.py rotate), its record sent first. Acks are opened
        with its key, and with the previous epoch's until the server has the new one."""
        old = self.sink.ep
        ep = await self.sink.rotate()
        self.link.opener = RotationAcks(Cum2Acks(ep.acks), Cum2Acks(old.acks))
        self._announce()
        return ep

    def tasks(self):
        """(name, coroutine function) pairs for the app to run under its guard."""
        return (("radio", self.radio.run), ("link", self.link.run))

    def drained(self):
        """True when every stored object has been acknowledged."""
        return self.outbox.next_entry(0) is None

    def housekeeping(self):
        """Called by the supervisor once a second."""
        self.sink.note_cert_known()

    def summary(self):
        out = {}
        if self.link is not None:
            for k, v in self.link.stats.items():
                out["link_" + k] = v
        for k, v in self.radio.stats.items():
            out["radio_" + k] = v
        if self.sink.ep is not None:
            out["epoch"] = self.sink.ep.number
            out["acks_rejected"] = sum(self.sink.ep.acks.counts.values())
        return out
