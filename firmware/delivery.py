# Store and forward, wired from the config: the secure element, the outbox, the sealing sink,
# the radio and the link layer. The application (firmware/app.py) gives records to `sink`
# and runs `tasks()` beside its own.
#
#   records -> SealingSink (firmware/sealing.py) -> Outbox (flash) -> Link -> radio
#   acks    <- radio <- Link.on_downlink -> EpochAcks: the opener of the ack's epoch
#              (firmware/ack.py) -> Outbox cursor
#
# Ack keys (issue 8 protocol note, section E): every epoch that still has objects in the
# outbox has an opener; the current one's key is in RAM, and each epoch's key is also kept
# wrapped by the secure element (firmware/ackkeys.py) from its start on, so that after a
# reboot the previous epochs' openers are restored. An epoch with nothing left in the outbox
# loses its opener and its envelope file (housekeeping).
import asyncio
from micropython import const

from drivers.stsafe.errors import SEError
from firmware import health as H
from firmware import log
from firmware.ack import Acks, EpochAcks
from firmware.ackkeys import AckKeyError, AckKeyStore
from firmware.epoch import EpochError
from firmware.link import Cum2Acks, Link
from firmware.outbox import Outbox
from firmware.seal import Opener
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


class Delivery:
    def __init__(self, cfg, ident, se, radio, health, data_dir):
        self.cfg = cfg
        self.se = se
        self.radio = radio
        self.health = health
        self.outbox = Outbox(data_dir + "/outbox", cfg["outbox_capacity"],
                             segment_bytes=cfg["outbox_segment"])
        # Not reclaimed yet: the sealing sink pins what the open epoch's tail needs first.
        rep = self.outbox.recover(reclaim=False)
        first_boot = rep.get("state") == "missing" and not rep.get("segments")
        if rep.get("torn_bytes") or rep.get("corrupt_regions") or not (
                rep.get("state") == "ok" or first_boot):
            _log.warn("outbox recovered: %s", rep)
        else:
            _log.info("outbox: %d pending objects", rep.get("pending", 0))
        self.sink = SealingSink(se, ident, self.outbox, health, data_dir,
                                cfg["checkpoint_every_n"], cfg["checkpoint_every_s"] * 1000)
        self.sink.on_epoch = self._new_epoch
        self.sink.on_urgent = self._urgent
        self.acks = EpochAcks()
        self.keys = AckKeyStore(se, ident.envelope_key_slot, data_dir + "/keys")
        self._device_id = ident.device_id.encode()
        self._restored = False
        self.link = None

    async def start(self):
        """Secure element up, new epoch stored; then the link can run. Retries forever with
        backoff: without an epoch no record can be sealed, and nothing else can replace it."""
        backoff = _START_RETRY_MIN_MS
        while True:
            try:
                await self.se.init()
                if not self._restored:
                    await self._restore()
                    self._restored = True
                ep = await self.sink.start()
                break
            except SE_FAILURES as e:
                self.health.count(H.SE_ERRORS)
                _log.error("epoch start failed: %s %s; retry in %d ms", type(e).__name__, e,
                           backoff)
                await asyncio.sleep_ms(backoff)
                backoff = min(backoff * 2, _START_RETRY_MAX_MS)
        lora = getattr(self.radio, "asks_acks", False)
        self.link = Link(self.outbox, [self.radio], Cum2Acks(self.acks),
                         window=self.cfg["lora_link_window" if lora else "link_window"],
                         coalesce_ms=self.cfg["lora_coalesce_ms"] if lora else 0,
                         ask_delay_ms=self.cfg["lora_ack_delay_ms"] if lora else 0)
        self._announce()
        return ep

    def _gone(self, number):
        """True if the outbox holds nothing of epoch `number` any more."""
        oldest = self.outbox.oldest()
        return oldest is None or oldest[0] > number

    async def _restore(self):
        """The openers of the previous epochs that still wait for an ack, from their
        envelopes: an epoch with an unacknowledged object in the outbox, and the newest one
        in the log (its tail checkpoint may be stored at this boot). The envelopes of the
        others are deleted (each unwrap costs a secure-element command at every boot)."""
        needed = set()
        pos = 0
        ob = self.outbox
        while True:  # one pass over what is pending, once per boot
            e = ob.next_entry(pos)
            if e is None:
                break
            needed.add(e.epoch)
            pos = e.next
        last = ob.info()["last"]
        if last is not None:
            needed.add(last[0])
        for number in self.keys.epochs():
            if number not in needed:
                self.keys.delete(number)
                continue
            try:
                key, iv = await self.keys.load(number)
            except AckKeyError as e:
                # Left on flash (the next boot tries again); this epoch's acks cannot open
                # meanwhile: its objects stay in the outbox, nothing is dropped.
                self.health.count(H.SE_ERRORS)
                _log.error("ack key of epoch %d not restored: %s %s", number, e.reason,
                           e.cause)
                continue
            self.acks.add(Acks(Opener(key, iv, self._device_id, number)))
            _log.info("ack key of epoch %d restored", number)

    async def _new_epoch(self, ep):
        """The sink's hook, before the epoch's first object is stored: its ack key wrapped on
        flash, its opener in the table."""
        key, iv = ep.take_ack_material()
        try:
            await self.keys.save(ep.number, key, iv)
        except AckKeyError as e:
            # Sealing goes on (records are never held back for this); after a reboot the acks
            # of this epoch could not open and its objects would stay in the outbox.
            self.health.count(H.SE_ERRORS)
            _log.error("ack key of epoch %d not wrapped: %s %s", ep.number, e.reason, e.cause)
        self.acks.add(ep.acks)

    def _urgent(self, pos):
        if self.link is not None:
            self.link.urgent(pos)

    def _announce(self):
        if self.sink.epoch_pos >= 0:
            self.link.announce(self.sink.epoch_pos)

    async def rotate(self):
        """A new epoch (firmware/sealing.py rotate: the current one closed first), its record
        sent first. The previous epoch's acks keep opening with its own key."""
        ep = await self.sink.rotate()
        self._announce()
        return ep

    async def close(self):
        """Clean shutdown: the closing checkpoint of the current epoch (sent if the link
        runs on)."""
        return await self.sink.close()

    def tasks(self):
        """(name, coroutine function) pairs for the app to run under its guard."""
        return (("radio", self.radio.run), ("link", self.link.run))

    def drained(self):
        """True when every stored object has been acknowledged."""
        return self.outbox.next_entry(0) is None

    def housekeeping(self):
        """Called by the supervisor once a second."""
        self.sink.note_cert_known()
        if self.link is not None:
            self.health.gauge(H.ACKS_REJECTED, self.link.stats["acks_rejected"])
        cur = self.sink.ep.number if self.sink.ep is not None else None
        for number in self.acks.epochs():
            if number != cur and self._gone(number):
                self.acks.drop(number)
                self.keys.delete(number)
                _log.info("epoch %d delivered: its ack key is forgotten", number)

    def summary(self):
        out = {}
        if self.link is not None:
            for k, v in self.link.stats.items():
                out["link_" + k] = v
        for k, v in self.radio.stats.items():
            out["radio_" + k] = v
        if hasattr(self.radio, "report"):
            out.update(self.radio.report())
        if self.sink.ep is not None:
            out["epoch"] = self.sink.ep.number
            out["acks_rejected"] = self.acks.rejected()
        return out
