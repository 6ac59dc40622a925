# Power-fail-safe outbox: an append-only log of sealed objects on the filesystem (littlefs on
# the board, plain files on the unix port), with an ack cursor committed atomically.
#
# Layout under `root`:
#   NNNNNNNN.seg   segment files (decimal segment number), appended in order, never rewritten
#                  except to cut a torn tail or purge a corrupt region (copy + rename).
#   state          ack cursor + overflow record, replaced atomically: write state.tmp, flush,
#                  close, rename over state (littlefs and POSIX rename are atomic).
#   *.tmp          leftovers of an interrupted replace: removed by recover().
#
# Entry on flash (little-endian), 16 bytes of overhead:
#   magic u8 = 0xB1 | kind u8 | len u16 | epoch u32 | seq u32 | data[len] | crc32 u32
# where crc32 (binascii.crc32, IEEE 802.3) covers magic..data.
#
# State file (little-endian):
#   b"OBS1" | n u16 | n x (epoch u32, cum i32, nb u8, bits[nb]) | ov u8
#   | [first_epoch u32, first_seq u32, last_epoch u32, last_seq u32, count u32 if ov] | crc32 u32
# For an epoch, every seq <= cum is acknowledged, and seq cum+1+i is if bit i of bits is set.
#
# Durability: `append` writes the whole entry with one write() and flushes the file before it
# returns (littlefs: lfs_file_sync, a copy-on-write commit; unix port: fsync). A power cut
# leaves littlefs at the last commit; a torn tail (a write cut short, e.g. at ENOSPC on plain
# files) is found and cut by recover(). Killing the process between any two syscalls leaves
# either the old or the new state of every file.
#
# Overflow is never silent: a refused append (capacity reached, flash full, I/O error) raises
# OutboxFull/OutboxError and adds the refused (epoch, seq) to the overflow record, which is
# persisted in the state file. The application seals a module event describing `overflow`
# and stores it with append(..., covers=overflow), which may use `reserve_bytes` beyond the
# capacity and clears the record once that event is durable (at least once: a power cut between
# the two may report the same loss twice, never zero times).
#
# Pin: `pin` = (epoch, seq) or None. Reclaim never deletes a segment holding an entry at or
# after the pin, acknowledged or not: the sealing side pins its last stored signed object, so
# every object not yet covered by a checkpoint stays on flash, whatever its ack state, and the
# previous epoch's open tail can be checkpointed from the outbox at the next boot after a power
# cut (firmware/sealing.py). The pin lives in RAM; recover(reclaim=False) leaves reclaiming to
# the caller, once it has set the pin again from what the log holds.
import os
import struct
from array import array
from binascii import crc32
from micropython import const

_DEBUG = const(False)

_MAGIC = const(0xB1)
_HDR = const(12)  # magic, kind, len, epoch, seq
_OVH = const(16)  # header + crc32
_MAX_KIND = const(127)  # the link frame carries the kind in 7 bits
_MAX_U32 = const(0xFFFFFFFF)
_MAX_SEG = const(0xFFFF)  # positions pack the offset in 16 bits
_MAX_BITS = const(256)  # acked-beyond-cumulative bits kept per epoch (acks cover a window)
_MAX_BITS_MASK = (1 << 256) - 1
_MAX_EPOCHS = const(0xFFFF)
_ENOSPC = const(28)  # errno ENOSPC: littlefs LFS_ERR_NOSPC and POSIX alike
_ENOENT = const(2)

_STATE = "state"
_STATE_TMP = "state.tmp"
_STATE_MAGIC = b"OBS1"
_SEG_SUFFIX = ".seg"
_TMP_SUFFIX = ".tmp"

KIND_EPOCH = const(0)
KIND_RECORD = const(1)
KIND_CHECKPOINT = const(2)
KIND_EVENT = const(3)


class OutboxError(Exception):
    """The outbox refused an operation. `reason`: short name; `detail`: data (errno, ids...)."""

    def __init__(self, reason, detail=None):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class OutboxFull(OutboxError):
    """An append refused for lack of room; the refused id is in the overflow record.

    reason: "capacity" (configured capacity reached) or "flash" (the filesystem said ENOSPC).
    `overflow` is the record after this refusal (see Outbox.overflow).
    """

    def __init__(self, reason, overflow):
        super().__init__(reason, overflow)
        self.overflow = overflow


class Entry:
    """One entry read from the log. Reused: `data` aliases an outbox buffer, valid until the
    next call into the outbox. `pos` is its position token, `next` the token just after it."""

    def __init__(self):
        self.kind = 0
        self.epoch = 0
        self.seq = 0
        self.data = None
        self.pos = 0
        self.next = 0


def _seg_name(segno):
    return "%08d%s" % (segno, _SEG_SUFFIX)


def _u32(mv, i):
    return mv[i] | (mv[i + 1] << 8) | (mv[i + 2] << 16) | (mv[i + 3] << 24)


def _crc_ok(mv, off, n):
    # n = data length; the crc follows the data
    end = off + _HDR + n
    return crc32(mv[off:end]) == _u32(mv, end)


def _parse_at(mv, off, end):
    """Length of the valid entry at mv[off:end], or 0 if there is none."""
    if end - off < _OVH or mv[off] != _MAGIC:
        return 0
    n = mv[off + 2] | (mv[off + 3] << 8)
    if off + _OVH + n > end or not _crc_ok(mv, off, n):
        return 0
    return _OVH + n


def _resync(mv, off, end):
    """First offset > off where a valid entry starts, or `end` (the rest is not an entry)."""
    off += 1
    while off + _OVH <= end:
        if mv[off] == _MAGIC and _parse_at(mv, off, end):
            return off
        off += 1
    return end


class Outbox:
    """Append-only log of sealed objects with an atomic ack cursor; see the module header.

    Outbox(root, capacity_bytes, segment_bytes=4096, reserve_bytes=256, max_data=1024)
      capacity_bytes: bytes of live segment files beyond which appends are refused
      reserve_bytes:  extra room only for the overflow event (append(..., covers=...))
      max_data:       largest object accepted (an epoch record with a certificate ~600 B)
    Call recover() once before anything else (it creates `root` if needed).
    """

    def __init__(self, root, capacity_bytes, segment_bytes=4096, reserve_bytes=256, max_data=1024):
        if segment_bytes > _MAX_SEG or max_data + _OVH > segment_bytes:
            raise OutboxError("config", (segment_bytes, max_data))
        if capacity_bytes < segment_bytes:
            raise OutboxError("config", (capacity_bytes, segment_bytes))
        self.root = root.rstrip("/")
        self.capacity = capacity_bytes
        self.segment_bytes = segment_bytes
        self.reserve = reserve_bytes
        self.max_data = max_data
        # Segment cache (recovery, scans): one segment at a time. _ebuf builds appends,
        # _rbuf serves read(); both hold one entry.
        self._cache = bytearray(segment_bytes)
        self._cmv = memoryview(self._cache)
        self._cache_seg = -1
        self._cache_len = 0
        self._ebuf = bytearray(max_data + _OVH)
        self._rbuf = bytearray(max_data + _OVH)
        self._entry = Entry()
        self._rentry = Entry()
        # Index of live segments, oldest first: (segno, size) pairs in one array, 8 bytes a
        # segment; entries stay on flash. _head caches (segno, size, first_epoch, last_epoch,
        # last_seq) of the oldest segment, rebuilt by a scan when that segment changes; _first
        # is the id of the oldest entry in the log (None: empty).
        self._ix = array("I")
        self._head = None
        self._first = None
        self._bytes = 0
        self._next_segno = 1
        self._f = None  # append handle on the newest segment
        self._fix_needed = False  # an append failed on the newest segment: check its tail
        self._sealed = False  # the newest segment takes no more appends (its tail is torn)
        self._last = None  # (epoch, seq) of the newest entry appended or refused
        self._acks = {}  # epoch -> [cum, bits]
        self._overflow = None  # [first_epoch, first_seq, last_epoch, last_seq, count]
        self._state_dirty = False
        self._recovered = False
        self.pin = None  # (epoch, seq): see the module header
        self.stats = {
            "appended": 0,
            "refused": 0,
            "lost": 0,
            "acked": 0,
            "reclaimed": 0,
            "state_writes": 0,
            "state_errors": 0,
            "corrupt": 0,
            "torn": 0,
        }

    # ---------------------------------------------------------------- paths and files

    def _path(self, name):
        return self.root + "/" + name

    def _nsegs(self):
        return len(self._ix) >> 1

    def _remove(self, name):
        try:
            os.remove(self._path(name))
        except OSError as e:
            if e.errno != _ENOENT:
                raise

    def _replace(self, name, mv):
        """Write mv to `name` atomically: tmp file, flush (sync), close, rename over."""
        tmp = self._path(name + _TMP_SUFFIX)
        f = open(tmp, "wb")
        try:
            f.write(mv)
            f.flush()
        finally:
            f.close()
        os.rename(tmp, self._path(name))

    def _load(self, segno, size):
        """Read segment `segno` (size bytes) into the cache, unless it is there already.
        Returns how many bytes of it self._cmv (the cache's memoryview) holds."""
        if self._cache_seg == segno and self._cache_len == size:
            return size
        if size > len(self._cache):
            # Explicit growth: only a segment written with a larger segment_bytes gets here.
            self._cache = bytearray(size)
            self._cmv = memoryview(self._cache)
        self._cache_seg = -1
        mv = self._cmv
        f = open(self._path(_seg_name(segno)), "rb")
        try:
            got = 0
            while got < size:
                n = f.readinto(mv[got:size])
                if not n:
                    break
                got += n
        finally:
            f.close()
        self._cache_seg = segno
        self._cache_len = got
        return got

    # ---------------------------------------------------------------- recovery

    def recover(self, reclaim=True):
        """Scan the log once: drop tmp files, load the state, cut torn tails, purge corrupt
        regions and out-of-order duplicates, rebuild the RAM index, reclaim acked segments
        (unless reclaim=False: the caller sets `pin` first, then commit()).
        Returns a report dict (counts and bytes of what was found)."""
        self._close_append()
        rep = {
            "segments": 0,
            "entries": 0,
            "pending": 0,
            "bytes": 0,
            "torn_bytes": 0,
            "corrupt_regions": 0,
            "corrupt_bytes": 0,
            "duplicates": 0,
            "state": "ok",
            "overflow": None,
        }
        try:
            os.mkdir(self.root)
        except OSError:
            pass  # exists (a missing parent shows up as an error on the listdir below)
        segnos = []
        tmps = []
        for ent in os.ilistdir(self.root):
            name = ent[0]
            if name.endswith(_TMP_SUFFIX):
                tmps.append(name)
            elif name.endswith(_SEG_SUFFIX):
                try:
                    segnos.append(int(name[: -len(_SEG_SUFFIX)]))
                except ValueError:
                    pass  # not ours
        for name in tmps:
            self._remove(name)
        segnos.sort()
        rep["state"] = self._load_state()
        self._ix = array("I")
        self._head = None
        self._first = None
        self._bytes = 0
        self._last = None
        self._cache_seg = -1
        self._fix_needed = False
        self._sealed = False
        self._next_segno = (segnos[-1] + 1) if segnos else 1
        for segno in segnos:
            self._recover_segment(segno, rep)
        self._recovered = True
        self._prune_acks()
        if reclaim:
            self._reclaim()
        if self._state_dirty:
            self._try_write_state()
        rep["segments"] = self._nsegs()
        rep["bytes"] = self._bytes
        e = self._entry
        pos = 0
        while True:
            if self.next_entry(pos) is None:
                break
            rep["pending"] += 1
            pos = e.next
        rep["overflow"] = self.overflow
        if _DEBUG:
            print("outbox: recover", rep)
        return rep

    def _recover_segment(self, segno, rep):
        name = _seg_name(segno)
        try:
            size = os.stat(self._path(name))[6]
        except OSError:
            return
        if size == 0:
            self._remove(name)
            return
        size = self._load(segno, size)
        mv = self._cmv
        off = 0
        out = 0  # compaction write offset: valid entries move left over bad regions
        count = 0
        dirty = False
        last = self._last
        while off < size:
            n = _parse_at(mv, off, size)
            if n == 0:
                nxt = _resync(mv, off, size)
                if nxt >= size:
                    rep["torn_bytes"] += size - off
                    self.stats["torn"] += 1
                else:
                    rep["corrupt_regions"] += 1
                    rep["corrupt_bytes"] += nxt - off
                    self.stats["corrupt"] += 1
                dirty = True
                off = nxt
                continue
            epoch = _u32(mv, off + 4)
            seq = _u32(mv, off + 8)
            if last is not None and (epoch < last[0] or (epoch == last[0] and seq <= last[1])):
                # An id not after the one before it: never written by append(); drop it.
                rep["duplicates"] += 1
                dirty = True
                off += n
                continue
            if out != off:
                mv[out : out + n] = mv[off : off + n]
            if self._first is None:
                self._first = (epoch, seq)
            count += 1
            last = (epoch, seq)
            out += n
            off += n
        if dirty:
            try:
                if out:
                    self._replace(name, mv[:out])
                else:
                    self._remove(name)
            except OSError as e:
                # Left as it is (e.g. ENOSPC): readers skip bad regions; retried next boot.
                if _DEBUG:
                    print("outbox: cannot rewrite", name, e)
                out = size
                self._cache_seg = -1  # the cache holds the compacted copy, not the file
            else:
                self._cache_seg = segno
                self._cache_len = out
        if count == 0:
            self._cache_seg = -1
            if not dirty:
                self._remove(name)
            return
        self._last = last
        self._ix.append(segno)
        self._ix.append(out)
        self._bytes += out
        rep["entries"] += count

    def _load_state(self):
        self._acks = {}
        self._overflow = None
        try:
            f = open(self._path(_STATE), "rb")
        except OSError:
            return "missing"
        try:
            raw = f.read()
        finally:
            f.close()
        try:
            self._parse_state(memoryview(raw))
        except (ValueError, IndexError):
            # Unreadable cursor: start from "nothing acked" (everything is resent; the server
            # is idempotent) and say so.
            self._acks = {}
            self._overflow = None
            self._state_dirty = True
            return "corrupt"
        return "ok"

    def _parse_state(self, mv):
        n = len(mv)
        if n < 11 or bytes(mv[:4]) != _STATE_MAGIC:
            raise ValueError("state magic")
        if crc32(mv[: n - 4]) != struct.unpack_from("<I", mv, n - 4)[0]:
            raise ValueError("state crc")
        (cnt,) = struct.unpack_from("<H", mv, 4)
        off = 6
        for _ in range(cnt):
            epoch, cum, nb = struct.unpack_from("<IiB", mv, off)
            off += 9
            if off + nb > n - 4:
                raise ValueError("state length")
            bits = int.from_bytes(bytes(mv[off : off + nb]), "little")
            off += nb
            self._acks[epoch] = [cum, bits]
        if mv[off]:
            self._overflow = list(struct.unpack_from("<IIIII", mv, off + 1))
            off += 20
        off += 1
        if off != n - 4:
            raise ValueError("state length")

    def _state_bytes(self):
        parts = [_STATE_MAGIC, struct.pack("<H", len(self._acks))]
        for epoch in sorted(self._acks):
            cum, bits = self._acks[epoch]
            nb = 0
            t = bits
            while t:
                t >>= 8
                nb += 1
            parts.append(struct.pack("<IiB", epoch, cum, nb))
            if nb:
                parts.append(bits.to_bytes(nb, "little"))
        ov = self._overflow
        if ov is None:
            parts.append(b"\x00")
        else:
            parts.append(b"\x01" + struct.pack("<IIIII", ov[0], ov[1], ov[2], ov[3], ov[4]))
        body = b"".join(parts)
        return body + struct.pack("<I", crc32(body))

    def _write_state(self):
        self._replace(_STATE, self._state_bytes())
        self._state_dirty = False
        self.stats["state_writes"] += 1

    def _try_write_state(self):
        try:
            self._write_state()
            return True
        except OSError as e:
            self._state_dirty = True
            self.stats["state_errors"] += 1
            if _DEBUG:
                print("outbox: state write failed", e)
            return False

    # ---------------------------------------------------------------- append

    def fits(self, n, reserve=False):
        """True if an object of n bytes fits now (with the overflow reserve if `reserve`)."""
        limit = self.capacity + (self.reserve if reserve else 0)
        return n <= self.max_data and self._bytes + n + _OVH <= limit

    def append(self, kind, epoch, seq, data, covers=None, reserve=False):
        """Store one sealed object; returns its position token once it is durable.

        Ids must increase: (epoch, seq) after the last one appended or refused. A refused
        append consumes its id: it is added to the overflow record and OutboxFull (no room) or
        OutboxError("io", errno) is raised. `covers`: the overflow record (as read from
        `overflow`) that this object reports; it may then use the reserve, and the record is
        cleared once the object is durable. `reserve`: the object may use the reserve too (a
        checkpoint: it moves the sealing side's pin, so that acked objects can be reclaimed).
        """
        if not self._recovered:
            raise OutboxError("not recovered")
        n = len(data)
        if kind < 0 or kind > _MAX_KIND or n > self.max_data or n == 0:
            raise OutboxError("bad entry", (kind, n))
        if epoch < 0 or epoch > _MAX_U32 or seq < 0 or seq > _MAX_U32:
            raise OutboxError("bad id", (epoch, seq))
        last = self._last
        if last is not None and (epoch < last[0] or (epoch == last[0] and seq <= last[1])):
            raise OutboxError("order", (last, (epoch, seq)))
        size = n + _OVH
        limit = self.capacity
        if covers is not None or reserve:
            limit += self.reserve
        if self._bytes + size > limit:
            self._reclaim()
            if self._bytes + size > limit:
                self._refuse(epoch, seq)
                raise OutboxFull("capacity", self.overflow)
        buf = self._ebuf
        struct.pack_into("<BBHII", buf, 0, _MAGIC, kind, n, epoch, seq)
        buf[_HDR : _HDR + n] = data
        mv = memoryview(buf)
        struct.pack_into("<I", buf, _HDR + n, crc32(mv[: _HDR + n]))
        try:
            if self._fix_needed:
                self._fix_tail()
            if self._f is None or self._ix[-1] + size > self.segment_bytes:
                self._open_segment(size)
            if self._f.write(mv[:size]) != size:
                # A short write on a file only happens when the device is full.
                raise OSError(_ENOSPC)
            self._f.flush()
        except OSError as e:
            self._close_append()
            self._fix_needed = True
            self._refuse(epoch, seq)
            if e.errno == _ENOSPC:
                raise OutboxFull("flash", self.overflow)
            raise OutboxError("io", e.errno)
        segno = self._ix[-2]
        off = self._ix[-1]
        pos = (segno << 16) | off
        if self._cache_seg == segno and self._cache_len == off:
            self._cache[off : off + size] = mv[:size]
            self._cache_len += size
        self._ix[-1] = off + size
        self._bytes += size
        self._last = (epoch, seq)
        if self._first is None:
            self._first = self._last
        self.stats["appended"] += 1
        if covers is not None and self._overflow is not None and list(covers) == self._overflow:
            self._overflow = None
            self._try_write_state()
        elif self._state_dirty:
            self._try_write_state()
        return pos

    def _open_segment(self, size):
        """Open the segment the next entry goes to: the newest one again, or a new one."""
        self._close_append()
        ix = self._ix
        if ix and not self._sealed and ix[-1] + size <= self.segment_bytes:
            self._f = open(self._path(_seg_name(ix[-2])), "ab")
            return
        segno = self._next_segno
        self._f = open(self._path(_seg_name(segno)), "ab")
        self._next_segno = segno + 1
        ix.append(segno)
        ix.append(0)
        self._sealed = False

    def _close_append(self):
        f = self._f
        self._f = None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass  # the failed append that led here already reported it

    def _fix_tail(self):
        """After a failed append: cut whatever it left past the newest segment's known end."""
        self._close_append()
        if self._ix:
            segno = self._ix[-2]
            good = self._ix[-1]
            name = _seg_name(segno)
            try:
                size = os.stat(self._path(name))[6]
            except OSError:
                size = 0
                if good:
                    raise
            if size > good:
                self.stats["torn"] += 1
                try:
                    if good == 0:
                        self._remove(name)
                    else:
                        self._cache_seg = -1
                        self._replace(name, self._cmv[: self._load(segno, good)])
                        self._cache_seg = segno
                        self._cache_len = good
                except OSError:
                    # Cannot cut it now (flash full?): append to a new segment instead and
                    # leave the torn tail to recover(), which cuts it at the next boot.
                    self._cache_seg = -1
                    self._sealed = True
        self._fix_needed = False

    def _refuse(self, epoch, seq):
        ov = self._overflow
        if ov is None:
            self._overflow = [epoch, seq, epoch, seq, 1]
        else:
            ov[2] = epoch
            ov[3] = seq
            ov[4] += 1
        self._last = (epoch, seq)
        self.stats["refused"] += 1
        self.stats["lost"] += 1
        self._try_write_state()

    @property
    def overflow(self):
        """None, or (first_epoch, first_seq, last_epoch, last_seq, count) of the objects that
        could not be stored since the last overflow event was stored."""
        ov = self._overflow
        return None if ov is None else tuple(ov)

    # ---------------------------------------------------------------- reading

    def _seg_index(self, segno):
        """Index of the first live segment numbered >= segno."""
        ix = self._ix
        n = len(ix) >> 1
        i = 0
        while i < n and ix[2 * i] < segno:
            i += 1
        return i

    def scan(self, pos=0):
        """The first entry at or after position `pos`, acknowledged or not, or None (reused
        Entry, as next_entry). Boot-time and rare paths: reads the log in order."""
        return self.next_entry(pos, True)

    def oldest(self):
        """(epoch, seq) of the oldest entry in the log, or None when it is empty."""
        return self._first

    def next_entry(self, pos=0, acked_too=False):
        """The first unacknowledged entry at or after position `pos` (0 = the start), or None.

        Returns the outbox's reused Entry (its data aliases the segment cache)."""
        segno = pos >> 16
        off = pos & 0xFFFF
        i = self._seg_index(segno)
        e = self._entry
        ix = self._ix
        while 2 * i < len(ix):
            cur = ix[2 * i]
            if cur != segno:
                off = 0
            size = ix[2 * i + 1]
            if off < size:
                if self._cache_seg != cur or self._cache_len != size:
                    size = self._load(cur, size)  # (a call with a heap-allocated frame)
                mv = self._cmv
                while off < size:
                    n = _parse_at(mv, off, size)
                    if n == 0:
                        # Damaged after recovery (or not purged): skip to the next good entry.
                        self.stats["corrupt"] += 1
                        off = _resync(mv, off, size)
                        continue
                    epoch = _u32(mv, off + 4)
                    seq = _u32(mv, off + 8)
                    if acked_too or not self.is_acked(epoch, seq):
                        dlen = n - _OVH
                        e.kind = mv[off + 1]
                        e.epoch = epoch
                        e.seq = seq
                        e.data = mv[off + _HDR : off + _HDR + dlen]
                        e.pos = (cur << 16) | off
                        e.next = (cur << 16) | (off + n)
                        return e
                    off += n
            i += 1
        return None

    def pending(self, pos=0):
        """Iterator over the unacknowledged entries from `pos`, in log order (reused Entry)."""
        while True:
            e = self.next_entry(pos)
            if e is None:
                return
            pos = e.next
            yield e

    def read(self, pos):
        """The entry at position `pos` (Entry, data aliasing a read buffer), or None if it is
        no longer in the log (reclaimed) or fails its CRC."""
        segno = pos >> 16
        off = pos & 0xFFFF
        i = self._seg_index(segno)
        ix = self._ix
        if 2 * i >= len(ix) or ix[2 * i] != segno or off >= ix[2 * i + 1]:
            return None
        buf = self._rbuf
        mv = memoryview(buf)
        if self._cache_seg == segno:
            n = _parse_at(self._cmv, off, self._cache_len)
            if n == 0:
                return None
            buf[:n] = self._cache[off : off + n]
        else:
            f = open(self._path(_seg_name(segno)), "rb")
            try:
                f.seek(off)
                if f.readinto(mv[:_HDR]) != _HDR or buf[0] != _MAGIC:
                    return None
                dlen = buf[2] | (buf[3] << 8)
                if dlen > self.max_data:
                    return None
                if f.readinto(mv[_HDR : _HDR + dlen + 4]) != dlen + 4:
                    return None
            finally:
                f.close()
            n = _parse_at(mv, 0, dlen + _OVH)
            if n == 0:
                return None
        e = self._rentry
        e.kind = buf[1]
        e.epoch = _u32(buf, 4)
        e.seq = _u32(buf, 8)
        e.data = mv[_HDR : n - 4]
        e.pos = pos
        e.next = pos + n
        return e

    # ---------------------------------------------------------------- acknowledgements

    def is_acked(self, epoch, seq):
        """True if (epoch, seq) is acknowledged, or older than everything left in the log
        (acknowledged and reclaimed)."""
        a = self._acks.get(epoch)
        if a is not None:
            d = seq - a[0]
            if d <= 0 or (d <= _MAX_BITS and (a[1] >> (d - 1)) & 1 == 1):
                return True
        f = self._first
        if f is None:
            f = self._last
            return f is not None and (epoch < f[0] or (epoch == f[0] and seq <= f[1]))
        return epoch < f[0] or (epoch == f[0] and seq < f[1])

    def mark_acked(self, epoch, cum_seq, bitmap=0, bitmap_len=0):
        """Apply a verified ack in RAM: every seq <= cum_seq of `epoch`, and cum_seq+1+i for
        each set bit i (LSB first) of bitmap[:bitmap_len]. cum_seq = -1: none cumulatively.
        Returns True if it acknowledged something new. Call commit() to make it durable."""
        if cum_seq < -1 or bitmap < 0 or bitmap_len < 0:
            raise OutboxError("bad ack", (epoch, cum_seq))
        last = self._last
        if last is None or epoch > last[0]:
            return False  # nothing of that epoch was ever appended
        if self._first is not None and epoch < self._first[0]:
            return False  # nothing of that epoch is left in the log
        # (masks only when needed: they are long integers, allocated)
        if bitmap_len > _MAX_BITS:
            bitmap_len = _MAX_BITS
        if bitmap >> bitmap_len:
            bitmap &= (1 << bitmap_len) - 1
        if epoch == last[0] and cum_seq + bitmap_len > last[1]:
            # Never ack ahead of what was appended: a later object must not be born acked.
            if cum_seq > last[1]:
                cum_seq = last[1]
                bitmap = 0
            elif bitmap >> (last[1] - cum_seq):
                bitmap &= (1 << (last[1] - cum_seq)) - 1
        a = self._acks.get(epoch)
        if a is None:
            a = self._acks[epoch] = [-1, 0]
        cum = cum0 = a[0]
        bits = bits0 = a[1]
        if cum_seq > cum:
            shift = cum_seq - cum
            bits = bits >> shift if shift <= _MAX_BITS else 0
            cum = cum_seq
        elif bitmap:
            shift = cum - cum_seq
            bitmap = bitmap >> shift if shift <= bitmap_len else 0
        if bitmap:
            bits |= bitmap
            if bits >> _MAX_BITS:
                bits &= _MAX_BITS_MASK
        while bits & 1:
            bits >>= 1
            cum += 1
        if cum == cum0 and bits == bits0:
            return False
        a[0] = cum
        a[1] = bits
        self.stats["acked"] += 1
        return True

    def commit(self):
        """Make the acks durable: reclaim fully acknowledged segments, then replace the state
        file atomically. Returns True if the state is on flash (False: retried later)."""
        self._reclaim()
        self._prune_acks()
        return self._try_write_state()

    def _prune_acks(self):
        keep = None if self._first is None else self._first[0]
        for epoch in list(self._acks):
            if keep is None or epoch < keep:
                del self._acks[epoch]
                self._state_dirty = True
        if len(self._acks) > _MAX_EPOCHS:
            for epoch in sorted(self._acks)[: len(self._acks) - _MAX_EPOCHS]:
                del self._acks[epoch]

    def _head_info(self):
        """(segno, size, first_epoch, last_epoch, last_seq, first_seq) of the oldest segment,
        or None."""
        ix = self._ix
        if not ix:
            return None
        h = self._head
        if h is not None and h[0] == ix[0] and h[1] == ix[1]:
            return h
        size = self._load(ix[0], ix[1])
        mv = self._cmv
        off = 0
        first = None
        last = (0, 0)
        while off < size:
            n = _parse_at(mv, off, size)
            if n == 0:
                off = _resync(mv, off, size)
                continue
            last = (_u32(mv, off + 4), _u32(mv, off + 8))
            if first is None:
                first = last
            off += n
        if first is None:
            first = last
        self._head = h = (ix[0], ix[1], first[0], last[0], last[1], first[1])
        return h

    def _head_acked(self):
        h = self._head_info()
        if h is None or not self.is_acked(h[3], h[4]):
            return False
        pin = self.pin
        if pin is not None and (h[3] > pin[0] or (h[3] == pin[0] and h[4] >= pin[1])):
            return False  # it holds the pinned entry or later ones (module header)
        size = self._load(h[0], h[1])
        mv = self._cmv
        off = 0
        while off < size:
            n = _parse_at(mv, off, size)
            if n == 0:
                off = _resync(mv, off, size)
                continue
            if not self.is_acked(_u32(mv, off + 4), _u32(mv, off + 8)):
                return False
            off += n
        return True

    def _reclaim(self):
        """Delete the oldest segments whose entries are all acknowledged (oldest first, so the
        log stays contiguous)."""
        while self._head_acked():
            ix = self._ix
            segno = ix[0]
            if len(ix) == 2:
                self._close_append()
                self._fix_needed = False
                self._sealed = False
            self._remove(_seg_name(segno))
            self._bytes -= ix[1]
            self._ix = ix[2:]
            self._head = None
            h = self._head_info()
            self._first = None if h is None else (h[2], h[5])
            if self._cache_seg == segno:
                self._cache_seg = -1
            self.stats["reclaimed"] += 1

    # ---------------------------------------------------------------- info

    def info(self):
        """A snapshot: live bytes and segments, capacity, last id, overflow, stats."""
        return {
            "bytes": self._bytes,
            "segments": self._nsegs(),
            "capacity": self.capacity,
            "last": self._last,
            "overflow": self.overflow,
            "stats": dict(self.stats),
        }

    def close(self):
        self._close_append()
