# Where a record is sealed and stored: the sink of firmware/app.py's Recorder.
#
#   record (CBOR, firmware/record.py)
#     -> seal: COSE_Encrypt0, AES-CCM, the epoch's record key (firmware/seal.py)
#     -> outbox append (firmware/outbox.py): durable before put() returns
#     -> checkpoint chain (firmware/checkpoint.py): every stored sealed object (records, module
#        events, the overflow event); every N objects or T minutes a COSE_Sign1 signed by the
#        secure element, linked to the signed object before it
#
# At start(), a new epoch (firmware/epoch.py: one-way counter, ephemeral key, ECDH, keys) and
# its signed epoch record, object 0 of the epoch, go to the outbox first. The plaintext record
# exists only in RAM. Sequence numbers come from the epoch, one counter for every object; a
# number is used once even when the outbox refuses the object (then the loss is recorded and
# reported by a sealed MOD_RECORDS_LOST event: never silent).
#
# Closing the chain (issue 8 protocol note, sections C and D): an epoch's last checkpoint, its
# closing one, is made at rotation (even over 0 objects), at clean shutdown (close()), and,
# when a power cut left the epoch open, at the next boot from the outbox (the tail
# checkpoint). The outbox is pinned at the last stored signed object of the open epoch, so
# every object not yet covered is still there. The end of the last closed epoch, (epoch,
# end_seq, SHA-256 of the closing payload), is kept in data_dir/epoch_end (replaced
# atomically: it outlives the outbox reclaiming that checkpoint) and named by the next epoch
# record.
#
# The tail checkpoint's seq: above every seq of that epoch in the outbox and in the outbox's
# overflow record. A seq consumed but neither stored nor refused before the cut (sealed, cut
# before the append) may be reused by the tail checkpoint: that is safe because
#   - no nonce was used twice: the epoch's record key is gone (RAM only), and a checkpoint is
#     signed by the factory key, not sealed, so it uses no nonce at all;
#   - the server never saw that object: the link sends only what the outbox holds, and the
#     append is durable before anything can read it; so no one can ever see two different
#     objects under one (epoch, seq).
import hashlib
import os
import struct
import time
from binascii import crc32
from micropython import const

from firmware import cbor, checkpoint, epoch, log, record, signed
from firmware import health as H
from firmware.outbox import KIND_CHECKPOINT, KIND_EPOCH, KIND_RECORD, OutboxError, OutboxFull
from firmware.seal import OVERHEAD_MAX

_log = log.Logger("seal")

KIND_EVENT = const(3)  # outbox kind of a sealed module event (firmware/outbox.py, link format)
_CERT_KNOWN = "cert_known"  # marker: the server has acked an epoch record with our certificate
# The end of the last closed epoch: b"SEE1" | epoch u32 | end_seq u32 | end_hash (32) | crc32
# (little-endian, crc32 over what precedes it); replaced atomically (tmp, flush, rename).
_END = "epoch_end"
_END_MAGIC = b"SEE1"
_END_LEN = const(48)


class _Tail:
    """The device id and number of a previous epoch, for its tail Checkpointer."""

    def __init__(self, device_id, number):
        self.device_id = device_id
        self.number = number


def _signed_payload(data):
    """The payload bytes of a stored signed object (tagged COSE_Sign1), or None."""
    try:
        obj = cbor.decode(data)
        p = obj.value[2]
    except (ValueError, AttributeError, IndexError, TypeError):
        return None
    return p if isinstance(p, bytes) else None


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
        self.on_epoch = None  # async fn(ep): called before the epoch's first object is stored
        self.on_urgent = None  # fn(pos): the record just stored at pos is urgent (an alarm)
        self._last_pos = -1  # outbox position of the last record stored by put()
        self.closed_end = None  # (epoch, end_seq, end_hash) of the last closed epoch
        self._booted = False
        self._pin_pos = 0  # outbox position of the pinned signed object
        self._out = bytearray(record.RECORD_MAX + OVERHEAD_MAX)
        self._enc = record.RecordEncoder(48)  # the overflow event
        self._cert_der = None
        self.epoch_pos = -1  # outbox position of the current epoch's record
        self._cert_is_known = None  # cached: the marker file is checked once

    async def start(self):
        """New epoch, its record stored. At the first start after boot the previous epoch is
        closed first if a power cut left it open. Raises EpochError (the caller retries)."""
        ident = self.ident
        if not self._booted:
            self.closed_end = self._load_end()
            await self._close_tail()
            self._booted = True
        server_pub = await self.se.read(ident.server_key_zone, ident.server_key_offset,
                                        ident.server_key_length)
        ep = await epoch.start(self.se, ident.device_id.encode(), bytes(server_pub),
                               ident.epoch_counter_zone, prev=self.closed_end)
        cert = await self._cert()
        by_reference = self._cert_known()
        if by_reference:
            unprotected = signed.unprotected_x5t(cert)
        else:
            unprotected = signed.unprotected_x5chain(cert)
        if self.on_epoch is not None:
            await self.on_epoch(ep)  # the ack key, wrapped, on flash before any object
        self.ep = ep
        self.cp = checkpoint.Checkpointer(ep, self.cp_n, self.cp_ms)
        _log.info("epoch %d started (certificate by %s)", ep.number,
                  "reference" if by_reference else "value")
        self.outbox.pin = (ep.number, 0)
        self.epoch_pos = self._store(KIND_EPOCH, ep.number, 0, ep.record(unprotected), "epoch")
        self._pin_pos = max(self.epoch_pos, 0)
        self.outbox.commit()  # what the old pin held and is acked can go now
        self._report_overflow()  # a loss recorded before the reboot is reported now
        return ep

    async def rotate(self):
        """A new epoch while running (the configured rotation): the current epoch is closed
        by a checkpoint (even over 0 objects), then start(). If the closing checkpoint cannot
        be made, EpochError("sign"): the current epoch goes on. If start() fails (EpochError)
        the current epoch goes on sealing too (its next closing checkpoint closes it again);
        the caller retries later. Call it with no record being made (firmware/app.py holds the
        Recorder's lock)."""
        if not await self._close_current():
            raise epoch.EpochError("sign", "closing checkpoint not stored")
        return await self.start()

    async def close(self):
        """Clean shutdown: the closing checkpoint of the current epoch. True if stored."""
        if self.ep is None:
            return False
        return await self._close_current()

    async def _close_current(self):
        if not await self._checkpoint():
            return False
        cp = self.cp
        return self._write_end(self.ep.number, cp.first_seq - 1, cp.prev)

    async def _cert(self):
        if self._cert_der is None:
            self._cert_der = await self.se.read_certificate(self.ident.cert_zone)
        return self._cert_der

    def _cert_known(self):
        if self._cert_is_known is None:
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

    # -- the end of the last closed epoch ---------------------------------------------------

    def _load_end(self):
        try:
            with open(self.data_dir + "/" + _END, "rb") as f:
                raw = f.read()
        except OSError:
            return None
        if (len(raw) != _END_LEN or raw[:4] != _END_MAGIC
                or crc32(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]):
            _log.error("%s unreadable: the next epoch names no previous one", _END)
            return None
        e, s = struct.unpack_from("<II", raw, 4)
        return (e, s, bytes(raw[12:44]))

    def _write_end(self, number, seq, h):
        body = _END_MAGIC + struct.pack("<II", number, seq) + h
        raw = body + struct.pack("<I", crc32(body))
        path = self.data_dir + "/" + _END
        try:
            with open(path + ".tmp", "wb") as f:
                f.write(raw)
                f.flush()
            os.rename(path + ".tmp", path)
        except OSError as e:
            _log.error("%s not written: %s", _END, e)
            return False
        self.closed_end = (number, seq, h)
        return True

    # -- the tail of an epoch left open by a power cut ------------------------------------

    async def _close_tail(self):
        """Checkpoint the newest epoch in the outbox if it is not closed (a power cut), from
        the objects the pin kept; record its end. Sets the outbox pin meanwhile. Raises
        EpochError("sign") if the secure element cannot sign it (start() is retried)."""
        ob = self.outbox
        end = self.closed_end
        # One pass over the log: the newest epoch, its last signed object, its highest seq.
        number = None
        sig_pos = sig_seq = -1
        sig_kind = 0
        top = -1
        pos = 0
        while True:
            e = ob.scan(pos)
            if e is None:
                break
            if e.epoch != number:
                number = e.epoch
                sig_pos = sig_seq = -1
                top = -1
            if e.kind == KIND_EPOCH or e.kind == KIND_CHECKPOINT:
                sig_pos, sig_seq, sig_kind = e.pos, e.seq, e.kind
            top = e.seq
            pos = e.next
        if number is None:
            return
        if end is not None and (number < end[0] or (number == end[0] and top <= end[1])):
            ob.pin = None
            return  # closed
        ov = ob.overflow
        if ov is not None and ov[2] == number and ov[3] > top:
            top = ov[3]  # a refused seq of that epoch was consumed too
        if sig_pos < 0:
            _log.error("no signed object of epoch %d in the outbox: tail not checkpointed",
                       number)
            return
        ob.pin = (number, sig_seq)
        e = ob.read(sig_pos)
        prev = None if e is None else _signed_payload(e.data)
        if prev is None:
            _log.error("signed object %d of epoch %d unreadable: tail not checkpointed",
                       sig_seq, number)
            return
        prev = hashlib.sha256(prev).digest()
        if sig_kind == KIND_CHECKPOINT and sig_seq == top:
            # Cut right after a checkpoint: it is the epoch's last object, so its closing one.
            self._write_end(number, sig_seq, prev)
            return
        tail = _Tail(self.ident.device_id.encode(), number)
        cp = checkpoint.Checkpointer(tail, self.cp_n, self.cp_ms, prev=prev,
                                     first_seq=1 if sig_kind == KIND_EPOCH else sig_seq + 1)
        self._add_from_outbox(cp, number, sig_pos)
        seq = top + 1
        try:
            p, obj = await cp.checkpoint(self.se, seq)
        except epoch._SE_FAILURES as e:
            raise epoch.EpochError("sign", e)
        if self._store(KIND_CHECKPOINT, number, seq, obj, "checkpoint") >= 0:
            # (not "epoch N ...": the bench reads "I seal: epoch N" as an epoch start)
            _log.info("tail checkpoint %d closes epoch %d (%d objects)", seq, number,
                      cp.count)
        # Stored or refused (then reported as lost with the next epoch), it is the end.
        self._write_end(number, seq, hashlib.sha256(p).digest())

    def _add_from_outbox(self, cp, number, pos):
        """Add to cp every stored sealed object of epoch `number` from outbox position `pos`
        on with seq >= cp.first_seq, acknowledged or not (the pin kept them)."""
        ob = self.outbox
        first = cp.first_seq
        while True:
            e = ob.scan(pos)
            if e is None or e.epoch > number:
                return
            pos = e.next
            if e.epoch == number and e.seq >= first and (e.kind == KIND_RECORD
                                                         or e.kind == KIND_EVENT):
                cp.add(e.seq, e.data)

    # -- the sink interface (firmware/app.py Recorder) -------------------------------------

    def next_seq(self):
        return self.ep.next_seq()

    async def put(self, kind, seq, cbor_rec):
        n = self.ep.sealer.seal(seq, cbor_rec, self._out)
        sealed = memoryview(self._out)[:n]
        pos = self._store(KIND_RECORD, self.ep.number, seq, sealed, record.KIND_NAMES[kind])
        self._last_pos = pos
        if pos >= 0:
            self.cp.add(seq, sealed)
            if self.cp.due():
                await self._checkpoint()
            return
        self._report_overflow()
        if self.cp.count:
            # The outbox is full and the pin holds everything since the last checkpoint,
            # acked or not: a checkpoint now lets what is acked be reclaimed.
            await self._checkpoint()

    def urgent(self):
        """The record put() just stored is urgent (a pump alarm): the link hears of it (no
        coalescing delay, sent before the backlog where the radio asks for acks)."""
        if self.on_urgent is not None and self._last_pos >= 0:
            self.on_urgent(self._last_pos)

    async def _checkpoint(self):
        """Sign and store a checkpoint over the open interval (0 objects or more). True if it
        is stored; otherwise the interval stays open (rebuilt from the outbox)."""
        ep = self.ep
        cp = self.cp
        seq = ep.next_seq()
        try:
            p, obj = await cp.checkpoint(self.se, seq)
        except Exception as e:  # noqa: BLE001 - a secure-element failure: named, counted
            if isinstance(e, MemoryError):
                raise
            self.health.count(H.SE_ERRORS)
            _log.error("checkpoint %d not signed: %s %s", seq, type(e).__name__, e)
            self._reopen()
            return False
        pos = self._store(KIND_CHECKPOINT, ep.number, seq, obj, "checkpoint")
        if pos < 0:
            self._reopen()
            self._report_overflow()
            return False
        cp.commit(seq, p)
        self.outbox.pin = (ep.number, seq)
        self._pin_pos = pos
        return True

    def _reopen(self):
        """The open interval again, from the outbox (a checkpoint was not signed or not
        stored: the hash of the interval was final)."""
        self.cp.restart()
        self._add_from_outbox(self.cp, self.ep.number, self._pin_pos)

    def _store(self, kind, number, seq, data, name):
        """Append one object; its outbox position, or -1 if refused (counted; the caller
        reports it with _report_overflow, never raised to the app). The debug line says what
        was stored (its number and kind, never its content). A checkpoint may use the
        outbox's reserve: storing it moves the pin, which lets acked objects be reclaimed."""
        try:
            pos = self.outbox.append(kind, number, seq, data, reserve=kind == KIND_CHECKPOINT)
            _log.debug("seq=%d kind=%s sealed=%d", seq, name, len(data))
            return pos
        except OutboxFull as e:
            self.health.count(H.RECORDS_LOST)
            _log.error("outbox full (%s): object %d of epoch %d not stored", e.reason, seq,
                       number)
        except OutboxError as e:
            self.health.count(H.RECORDS_LOST)
            _log.error("outbox error %s %s: object %d not stored", e.reason, e.detail, seq)
        return -1

    def _report_overflow(self):
        """Seal and store the event that names what the outbox could not keep (it may use the
        outbox's reserve); it is in the checkpoint chain like every sealed object. If even that
        fails, the loss stays recorded and is reported at the next refusal or at the next
        boot's first store."""
        ov = self.outbox.overflow
        if ov is None or self.ep is None:
            return
        ep = self.ep
        seq = ep.next_seq()
        ev = self._enc.coded(seq, int(time.time()), record.KIND_MODULE, record.MOD_RECORDS_LOST,
                             ov[4])
        n = ep.sealer.seal(seq, ev, self._out)
        sealed = memoryview(self._out)[:n]
        try:
            self.outbox.append(KIND_EVENT, ep.number, seq, sealed, covers=ov)
        except OutboxError as e:
            _log.error("loss report not stored either: %s", e.reason)
            return
        self.cp.add(seq, sealed)
        _log.debug("seq=%d kind=records_lost sealed=%d", seq, n)
        _log.warn("reported %d objects lost (epoch %d seq %d .. epoch %d seq %d)",
                  ov[4], ov[0], ov[1], ov[2], ov[3])
