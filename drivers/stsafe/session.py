# STSAFE-A110 driver: session layer. Host C-MAC / R-MAC, command/response encryption, the
# counter N, and one command/response exchange over the shared frame buffer.
# MIT licence, (c) serene-module authors. Spec: specs/stsafe-a110.md §6 (and §2 for frames).
#
# AES-CMAC (RFC 4493) and AES-CBC are built on cryptolib.aes in ECB mode (mode 1), which every
# port with cryptolib has; the unix port has no CTR. No allocation per block: the MAC state,
# the IV and the scratch blocks are preallocated bytearrays.
import asyncio
import time
from cryptolib import aes
from micropython import const

from . import frame
from .errors import (
    CRCError,
    CryptoError,
    LengthError,
    ParameterError,
    RMACError,
    status_class,
    status_error,
)

_DEBUG = const(False)

_ECB = const(1)
# IV/subject block subjects (spec §6, [MW] InSubject<<6, [SL] STSAFEA_AES_SUBJECT_HOST_*).
SUBJECT_CMAC = const(0x00)
SUBJECT_RMAC = const(0x40)
SUBJECT_CMD_ENC = const(0x80)
SUBJECT_RSP_DEC = const(0xC0)
_MAC_FIRST_CMD = const(0x00)  # byte after the IV block in the C-MAC input
_MAC_FIRST_RSP = const(0x80)  # byte after the IV block in the R-MAC input
# Command authorization (Query 0x24, spec §4): access conditions and encryption flags.
AC_NEVER = const(0)
AC_FREE = const(1)
AC_HOST = const(3)
AC_ADMIN_OR_HOST = const(5)
ENC_RSP = const(0x01)
ENC_CMD = const(0x02)
_COUNTER_MASK = const(0xFFFFFF)  # N is 24 bits on the A110 (spec §6)
# Bad CRC or bad LEN on a response: the chip keeps its response and every read restarts at
# byte 0 (spec §1), so re-reading is the safe retry (re-sending would execute twice).
_REREADS = const(2)
# Status 0x01 means the chip got a corrupted command and did not execute it (spec §2, ST
# staff on the ST forum): one re-send. Status 0x16 with a counter that moved behind our back
# (a lost response): one re-send after re-querying N. Nothing else is re-sent.
_RESENDS = const(1)
CommunicationError = status_class(0x01)  # these two are always made: run() catches them
InvalidCMAC = status_class(0x16)


def _dbl(b):
    """Double b in GF(2^128), in place (RFC 4493 subkey generation)."""
    carry = b[0] & 0x80
    for i in range(15):
        b[i] = ((b[i] << 1) & 0xFF) | (b[i + 1] >> 7)
    b[15] = ((b[15] << 1) & 0xFF) ^ (0x87 if carry else 0)


class Cmac:
    """Streaming AES-128-CMAC (RFC 4493) over an ECB object. No allocation after __init__.

    The last complete block is absorbed lazily, when more data arrives, so that finish() can
    apply subkey K1 (complete last block) or pad + K2 (partial or empty last block).
    """

    def __init__(self, ecb, k1, k2):
        self._ecb = ecb
        self._k1 = k1
        self._k2 = k2
        self.x = bytearray(16)
        self._k = 0

    def start(self):
        x = self.x
        for i in range(16):
            x[i] = 0
        self._k = 0

    def update(self, data, start, end):
        x = self.x
        k = self._k
        ecb = self._ecb
        for i in range(start, end):
            if k == 16:
                ecb.encrypt(x, x)
                k = 0
            x[k] ^= data[i]
            k += 1
        self._k = k

    def finish(self):
        """Return the 16-byte tag. It aliases this object's state (valid until start())."""
        x = self.x
        k = self._k
        if k == 16:
            sub = self._k1
        else:
            x[k] ^= 0x80
            sub = self._k2
        for i in range(16):
            x[i] ^= sub[i]
        self._ecb.encrypt(x, x)
        return x


class HostKeys:
    """The host MAC key and host cipher key (AES-128 each) and the secure-channel maths.

    All methods work in place on caller buffers; results that are internal buffers say so.
    """

    def __init__(self, mac_key, cipher_key):
        if len(mac_key) != 16 or len(cipher_key) != 16:
            raise ParameterError(None, detail="host keys are 16 bytes each")
        ecb = aes(bytes(mac_key), _ECB)
        k1 = bytearray(16)
        ecb.encrypt(k1, k1)  # L = AES(K, 0^128)
        _dbl(k1)
        k2 = bytearray(k1)
        _dbl(k2)
        self.c_mac = Cmac(ecb, k1, k2)
        self.r_mac = Cmac(ecb, k1, k2)
        self._enc = aes(bytes(cipher_key), _ECB)  # cryptolib: one direction per object
        self._dec = aes(bytes(cipher_key), _ECB)
        self._blk = bytearray(16)
        self._iv = bytearray(16)
        self._t = bytearray(16)
        self._c = bytearray(16)
        self._s = bytearray(4)

    def block(self, n, subject):
        """IV/subject block [N2 N1 N0][subject][0x80][0 x 11] (aliases an internal buffer)."""
        b = self._blk
        b[0] = (n >> 16) & 0xFF
        b[1] = (n >> 8) & 0xFF
        b[2] = n & 0xFF
        b[3] = subject
        b[4] = 0x80
        for i in range(5, 16):
            b[i] = 0
        return b

    def iv(self, n, subject):
        """CBC IV = AES-ECB(cipher key, block(n, subject)) (aliases an internal buffer)."""
        self._enc.encrypt(self.block(n, subject), self._iv)
        return self._iv

    def mac_command(self, n, buf, p):
        """Write the C-MAC (counter n) of command buf[0] + buf[1:1+p] at buf[1+p:5+p].

        Also starts the R-MAC (counter n+1) over the same command, to be finished by
        check_rmac() once the response has overwritten the buffer.
        """
        s = self._s
        s[1] = buf[0]
        s[2] = p >> 8
        s[3] = p & 0xFF
        cm = self.c_mac
        cm.start()
        cm.update(self.block(n, SUBJECT_CMAC), 0, 16)
        s[0] = _MAC_FIRST_CMD
        cm.update(s, 0, 4)
        cm.update(buf, 1, 1 + p)
        tag = cm.finish()
        for i in range(frame.MAC_LEN):
            buf[1 + p + i] = tag[i]
        rm = self.r_mac
        rm.start()
        rm.update(self.block((n + 1) & _COUNTER_MASK, SUBJECT_RMAC), 0, 16)
        s[0] = _MAC_FIRST_RSP
        rm.update(s, 0, 4)
        rm.update(buf, 1, 1 + p)

    def check_rmac(self, buf, m):
        """Finish the R-MAC with STATUS buf[0], BE16(m), DATA buf[3:3+m]; compare it with
        buf[3+m:7+m]. True if equal (constant-time compare)."""
        s = self._s
        s[0] = buf[0]
        s[1] = m >> 8
        s[2] = m & 0xFF
        rm = self.r_mac
        rm.update(s, 0, 3)
        rm.update(buf, 3, 3 + m)
        tag = rm.finish()
        diff = 0
        for i in range(frame.MAC_LEN):
            diff |= tag[i] ^ buf[3 + m + i]
        return diff == 0

    def encrypt(self, n, buf, start, p):
        """Pad buf[start:start+p] with 0x80 0x00.. to a multiple of 16 (ISO/IEC 9797-1
        method 2) and AES-CBC encrypt it in place, IV from block(n+1, 0x80). Returns the
        padded length. The caller guarantees room for up to 16 more bytes."""
        q = (p + 16) & ~15
        buf[start + p] = 0x80
        for i in range(start + p + 1, start + q):
            buf[i] = 0
        prev = self.iv((n + 1) & _COUNTER_MASK, SUBJECT_CMD_ENC)
        t = self._t
        enc = self._enc
        for off in range(start, start + q, 16):
            for j in range(16):
                t[j] = buf[off + j] ^ prev[j]
            enc.encrypt(t, prev)
            for j in range(16):
                buf[off + j] = prev[j]
        return q

    def decrypt(self, n, buf, start, m):
        """AES-CBC decrypt buf[start:start+m] in place (IV from block(n+1, 0xC0)) and strip
        the 0x80 0x00.. padding. Returns the plaintext length, or -1 if the length or the
        padding is wrong."""
        if m == 0 or m & 15:
            return -1
        prev = self.iv((n + 1) & _COUNTER_MASK, SUBJECT_RSP_DEC)
        c = self._c
        t = self._t
        dec = self._dec
        for off in range(start, start + m, 16):
            for j in range(16):
                c[j] = buf[off + j]
            dec.decrypt(c, t)
            for j in range(16):
                buf[off + j] = t[j] ^ prev[j]
            prev, c = c, prev
        # Up to 16 zero bytes after the 0x80: accepts the minimal padding ([SL], the chip)
        # and [MW]'s extra block when the plaintext length is 15 mod 16 (spec §8).
        i = start + m - 1
        while i >= start and buf[i] == 0 and start + m - i <= 16:
            i -= 1
        if i < start or buf[i] != 0x80:
            return -1
        return i - start


class Session:
    """Command/response exchanges, one at a time, over one preallocated frame buffer.

    Holds the host keys, the host C-MAC counter N (None = unknown: re-queried before the next
    MAC'd command), the chip's command authorization table (Query 0x24) and the zones' access
    conditions (Query 0x12). The STSAFE API class derives from it.
    """

    def __init__(self, transport, keys, busy_timeout_ms, mac_all):
        self.buf = bytearray(frame.MAX_FRAME + 16)  # + room for the CBC padding block
        self.mv = memoryview(self.buf)
        self.lock = asyncio.Lock()  # one command/response pair at a time
        self.t = transport
        self.keys = keys
        self.n = None
        self.auth = {}  # cmd -> (ac, enc flags)
        self.zones = {}  # index -> (type, read_ac, update_ac, size)
        self.busy_timeout_ms = busy_timeout_ms
        self.mac_all = mac_all
        self.sync = None  # async fn(session): Query host key slot under the held lock
        self.resyncs = 0  # counter resynchronisations after a lost step (diagnostics)

    def protection(self, cmd, need_mac, no_mac):
        """(mac, enc flags) for cmd: as the chip requires, or MAC'd by policy (mac_all)."""
        ac, enc = self.auth.get(cmd, (AC_FREE, 0))
        mac = need_mac or enc != 0 or ac == AC_HOST or ac == AC_ADMIN_OR_HOST
        if mac and self.keys is None:
            raise CryptoError(cmd, detail="host keys needed")
        if not mac and self.mac_all and self.keys is not None and not no_mac:
            mac = True
        return mac, enc

    async def run(self, cmd, wait_ms, expect, build, parse, arg, need_mac=False, no_mac=False,
                  locked=False):  # fmt: skip
        """One command under the lock: build(buf, arg) -> payload length; send; receive;
        check; return parse(self, m, arg), m being the response data length, the data
        buf[3:3+m] (parse runs under the lock: nothing aliasing the buffer escapes).

        expect: exact plaintext data length, or None if variable. One deadline per exchange:
        wait_ms + busy_timeout_ms from the write. locked=True: the caller already holds the
        lock (the resync of N from inside another command).
        """
        if not locked:
            await self.lock.acquire()  # (cheaper on the heap than `async with`)
        try:
            resends = 0
            while True:
                mac, enc = self.protection(cmd, need_mac, no_mac)
                if mac and self.n is None:
                    await self.sync(self)
                    if self.n is None:
                        raise CryptoError(cmd, detail="no host keys in the chip")
                used = self.n
                p = build(self.buf, arg)
                try:
                    m = await self._exchange(cmd, p, wait_ms, expect, mac, enc)
                    return parse(self, m, arg)
                except CommunicationError:
                    if resends >= _RESENDS:
                        raise
                except InvalidCMAC:
                    if resends >= _RESENDS:
                        raise
                    await self.sync(self)
                    if self.n is None or self.n == used:
                        raise  # same counter: the keys are wrong, not a lost step
                    self.resyncs += 1
                resends += 1
                if _DEBUG:
                    print("stsafe: re-send cmd", cmd)
        finally:
            if not locked:
                self.lock.release()

    async def _exchange(self, cmd, p, wait_ms, expect, mac, enc):
        buf = self.buf
        keys = self.keys
        n = self.n
        hdr = cmd
        end = 1 + p
        if mac:
            hdr |= frame.HDR_HOST_MAC
            if enc & ENC_CMD:
                p = keys.encrypt(n, buf, 1, p)
            end = 1 + p + frame.MAC_LEN
        if end + frame.CRC_LEN > frame.MAX_FRAME:
            raise ParameterError(cmd, detail="command frame too long")
        buf[0] = hdr
        if mac:
            keys.mac_command(n, buf, p)
            self.n = None  # unknown until a response proves the chip counted this command
        total = frame.seal_command(buf, end)
        deadline = time.ticks_add(time.ticks_ms(), wait_ms + self.busy_timeout_ms)
        await self.t.write(self.mv[:total], cmd, deadline)
        if wait_ms:
            await asyncio.sleep_ms(wait_ms)  # the chip's minimum processing time (spec §1)
        if expect is None:
            want = frame.RSP_HDR_LEN
        else:
            want = expect
            if enc & ENC_RSP:
                want = (want + 16) & ~15
            want += frame.RSP_HDR_LEN + frame.CRC_LEN + (frame.MAC_LEN if mac else 0)
        total = await self._receive(cmd, want, deadline)
        status = buf[0]
        if status & frame.STATUS_MASK:
            raise status_error(cmd, status)
        m = total - frame.RSP_HDR_LEN - frame.CRC_LEN
        if status & frame.STATUS_RMAC:
            m -= frame.MAC_LEN
            if m < 0:
                raise LengthError(cmd, detail=total)
        if mac:
            if not status & frame.STATUS_RMAC or not keys.check_rmac(buf, m):
                raise RMACError(cmd)
            self.n = (n + 1) & _COUNTER_MASK
            if enc & ENC_RSP:
                m = keys.decrypt(n, buf, frame.RSP_HDR_LEN, m)
                if m < 0:
                    raise CryptoError(cmd, detail="bad response padding")
        if expect is not None and m != expect:
            raise LengthError(cmd, detail=m)
        return m

    async def _receive(self, cmd, want, deadline):
        """Read the response (re-reading it whole if LEN says it is longer than `want`); check
        LEN and CRC, re-reading up to _REREADS times. Returns its total length."""
        buf = self.buf
        size = len(buf)
        if want > size:
            want = size
        bad = 0
        while True:
            await self.t.read(self.mv[:want], cmd, deadline)
            total = frame.response_length(buf)
            if total < frame.RSP_HDR_LEN + frame.CRC_LEN or total > size:
                err = LengthError
            elif total > want:
                want = total  # [MW]: read the whole frame again from the start
                continue
            elif frame.response_crc_ok(buf, total):
                return total
            else:
                err = CRCError
            bad += 1
            if bad > _REREADS or time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                raise err(cmd, detail=total)
            if _DEBUG:
                print("stsafe: re-read cmd", cmd, err)
