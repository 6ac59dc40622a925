# Where a record is sealed and stored: the sink of firmware/app.py's Recorder.
#
#   record (CBOR, firmware/record.py)
#     -> seal: COSE_Encrypt0, AES-CCM, the epoch's record key (firmware/seal.py)
#     -> checkpoint chain (firmware/checkpoint.py): every N objects or T minutes, a COSE_Sign1
#        signed by the secure element over the hash chain of the sealed objects
#     -> outbox append (firmware/outbox.py): durable before put() returns
#
# At start(), a new epoch (firmware/epoch.py: one-way counter, ephemeral key, ECDH, keys) and
# its signed epoch record, object 0 of the epoch, go to the outbox first. The plaintext record
# exists only in RAM. Sequence numbers come from the epoch, one counter for every object; a
# number is used once even when the outbox refuses the object (then the loss is recorded and
# reported by a sealed MOD_RECORDS_LOST event: never silent).
import time
from micropython import const

from firmware import checkpoint, epoch, log, record, signed
from firmware import health as H
from firmware.outbox import KIND_CHECKPOINT, KIND_EPOCH, KIND_RECORD, OutboxError, OutboxFull
from firmware.seal import OVERHEAD_MAX

_log = log.Logger("seal")

KIND_EVENT = const(3)  # outbox kind of a sealed module event (firmware/outbox.py, link format)
_CERT_KNOWN = "cert_known"  # marker: the server has acked an epoch record with our certificate


class SealingSink:
    def __init__(self, se, ident, outbox, health, data_dir, checkpoint_n, checkpoint_ms):
        self.se = se
        self.ident = ident
        self.outbox = outbox
        self.health = health
        self.data_dir = data_dir
        self.cp_n = checkpoint_n
        self.cp_ms = checkpoint_ms
        self.ep = None
        self.cp = None
        self._out = bytearray(record.RECORD_MAX + OVERHEAD_MAX)
        self._enc = record.RecordEncoder(48)  # the overflow event
        self._cert_der = None
        self.epoch_pos = -1  # outbox position of the current epoch's record
        self._cert_is_known = None  # cached: the marker file is checked once

    async def start(self):
        """New epoch, its record stored. Raises EpochError (the caller retries)."""
        ident = self.ident
        server_pub = await self.se.read(ident.server_key_zone, ident.server_key_offset,
                                        ident.server_key_length)
        ep = await epoch.start(self.se, ident.device_id.encode(), bytes(server_pub),
                               ident.epoch_counter_zone)
        cert = await self._cert()
        by_reference = self._cert_known()
        if by_reference:
            unprotected = signed.unprotected_x5t(cert)
        else:
            unprotected = signed.unprotected_x5chain(cert)
        self.ep = ep
        self.cp = checkpoint.Checkpointer(ep, self.cp_n, self.cp_ms)
        _log.info("epoch %d started (certificate by %s)", ep.number,
                  "reference" if by_reference else "value")
        self.epoch_pos = self._store(KIND_EPOCH, 0, ep.record(unprotected), "epoch")
        self._report_overflow()  # a loss recorded before the reboot is reported now
        return ep

    async def rotate(self):
        """A new epoch while running (the configured rotation): the open checkpoint interval
        of the current epoch is closed first, then start(). If start() fails (EpochError) the
        current epoch goes on sealing; the caller retries later. Call it with no record being
        made (firmware/app.py holds the Recorder's lock)."""
        if self.cp.count:
            await self._checkpoint()
        return await self.start()

    async def _cert(self):
        if self._cert_der is None:
            self._cert_der = await self.se.read_certificate(self.ident.cert_zone)
        return self._cert_der

    def _cert_known(self):
        if self._cert_is_known is None:
            import os

            try:
                os.stat(self.data_dir + "/" + _CERT_KNOWN)
                self._cert_is_known = True
            except OSError:
                self._cert_is_known = False
        return self._cert_is_known

    def note_cert_known(self):
        """Called once the server has acknowledged an epoch record that carried the
        certificate: later epochs send it by reference."""
        if not self._cert_known() and self.outbox.is_acked(self.ep.number, 0):
            with open(self.data_dir + "/" + _CERT_KNOWN, "w") as f:
                f.write("1")
            self._cert_is_known = True

    # -- the sink interface (firmware/app.py Recorder) -------------------------------------

    def next_seq(self):
        return self.ep.next_seq()

    async def put(self, kind, seq, cbor):
        n = self.ep.sealer.seal(seq, cbor, self._out)
        sealed = memoryview(self._out)[:n]
        if self._store(KIND_RECORD, seq, sealed, record.KIND_NAMES[kind]) >= 0:
            self.cp.add(seq, sealed)
        if self.cp.due():
            await self._checkpoint()

    async def _checkpoint(self):
        seq = self.ep.next_seq()
        try:
            obj = await self.cp.checkpoint(self.se, seq)
        except Exception as e:  # noqa: BLE001 - a secure-element failure: named, counted
            if isinstance(e, MemoryError):
                raise
            self.health.count(H.SE_ERRORS)
            _log.error("checkpoint %d not signed: %s %s", seq, type(e).__name__, e)
            return
        self._store(KIND_CHECKPOINT, seq, obj, "checkpoint")

    def _store(self, kind, seq, data, name):
        """Append one object; its outbox position, or -1 if refused (counted and reported,
        never raised to the app). The debug line says what was stored (its number and kind,
        never its content)."""
        try:
            pos = self.outbox.append(kind, self.ep.number, seq, data)
            _log.debug("seq=%d kind=%s sealed=%d", seq, name, len(data))
            return pos
        except OutboxFull as e:
            self.health.count(H.RECORDS_LOST)
            _log.error("outbox full (%s): object %d of epoch %d not stored", e.reason, seq,
                       self.ep.number)
        except OutboxError as e:
            self.health.count(H.RECORDS_LOST)
            _log.error("outbox error %s %s: object %d not stored", e.reason, e.detail, seq)
        self._report_overflow()
        return -1

    def _report_overflow(self):
        """Seal and store the event that names what the outbox could not keep (it may use the
        outbox's reserve). If even that fails, the loss stays recorded and is reported at the
        next refusal or at the next boot's first store."""
        ov = self.outbox.overflow
        if ov is None:
            return
        seq = self.ep.next_seq()
        ev = self._enc.coded(seq, int(time.time()), record.KIND_MODULE, record.MOD_RECORDS_LOST,
                             ov[4])
        n = self.ep.sealer.seal(seq, ev, self._out)
        try:
            self.outbox.append(KIND_EVENT, self.ep.number, seq, memoryview(self._out)[:n],
                               covers=ov)
            _log.debug("seq=%d kind=records_lost sealed=%d", seq, n)
            _log.warn("reported %d objects lost (epoch %d seq %d .. epoch %d seq %d)",
                      ov[4], ov[0], ov[1], ov[2], ov[3])
        except OutboxError as e:
            _log.error("loss report not stored either: %s", e.reason)
