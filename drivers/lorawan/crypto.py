# LoRaWAN 1.0.x cryptography on cryptolib's AES-128 ECB (LoRaWAN L2 1.0.4 §4.3.3, §4.4, §6.2).
#
# Copyright (c) the serene-module authors. MIT licence.
#
# MicroPython's cryptolib has ECB and CBC, no CMAC and no CTR: AES-CMAC (RFC 4493) and the
# LoRaWAN "A_i" keystream are built on single-block ECB here, as firmware/crypto/aes_ccm.py
# builds CCM. Each key object holds its scratch blocks; the per-frame calls allocate nothing.
#   - MIC of a data frame: AES-CMAC(NwkSKey, B0 | msg)[0:4], B0 = 0x49 | 0^4 | Dir | DevAddr |
#     FCnt(32) | 0x00 | len(msg) (§4.4).
#   - FRMPayload: XOR with AES(K, A_i), A_i = 0x01 | 0^4 | Dir | DevAddr | FCnt(32) | 0x00 | i,
#     i from 1 (§4.3.3); K = NwkSKey on FPort 0, AppSKey otherwise.
#   - Join-request / join-accept MIC: AES-CMAC(AppKey, ...)[0:4] (§6.2.4, §6.2.6).
#   - Join-accept "decryption" is AES *encryption* with the AppKey (the network server decrypts
#     to produce it, so that a device only ever needs the encrypt direction: §6.2.6).
#   - 1.0.x session keys: NwkSKey = AES(AppKey, 0x01 | JoinNonce | NetID | DevNonce | pad),
#     AppSKey with 0x02 (§6.2.6).
# Checked against a reference the tests write with `cryptography` (tests/test_lora_frames.py)
# and the RFC 4493 §4 vectors (tests/upy/test_lorawan_crypto.py).
import cryptolib
from micropython import const

_BLOCK = const(16)
_ECB = const(1)  # cryptolib mode 1 = ECB
_RB = const(0x87)  # RFC 4493 §2.3: R_128 constant for the subkey doubling


def _dbl(src, dst):
    # Doubling in GF(2^128) (RFC 4493 §2.3, "generate subkey").
    msb = src[0] & 0x80
    for i in range(15):
        dst[i] = ((src[i] << 1) & 0xFF) | (src[i + 1] >> 7)
    dst[15] = (src[15] << 1) & 0xFF
    if msb:
        dst[15] ^= _RB


class Key:
    """One AES-128 key: ECB block encryption and AES-CMAC. Not reentrant."""

    def __init__(self, key):
        if len(key) != _BLOCK:
            raise ValueError("AES-128 key must be 16 bytes")
        self._aes = cryptolib.aes(bytes(key), _ECB)
        self._x = bytearray(_BLOCK)  # CMAC chaining value
        self._blk = bytearray(_BLOCK)  # A_i / B0 / scratch
        self._s = bytearray(_BLOCK)  # keystream block
        self._k1 = bytearray(_BLOCK)
        self._k2 = bytearray(_BLOCK)
        self._aes.encrypt(self._k1, self._s)  # L = AES(K, 0^128)
        _dbl(self._s, self._k1)
        _dbl(self._k1, self._k2)
        self._pos = 0

    def encrypt_block(self, src, dst):
        self._aes.encrypt(src, dst)

    # --- AES-CMAC, streaming: cmac_start, cmac_update..., cmac_finish ---------------------

    def cmac_start(self):
        x = self._x
        for i in range(_BLOCK):
            x[i] = 0
        self._pos = 0

    def cmac_update(self, data, off=0, n=-1):
        if n < 0:
            n = len(data) - off
        x = self._x
        pos = self._pos
        for i in range(off, off + n):
            if pos == _BLOCK:  # a full block with more data after it: not the last one
                self._aes.encrypt(x, x)
                pos = 0
            x[pos] ^= data[i]
            pos += 1
        self._pos = pos

    def cmac_finish(self):
        """The 16-byte tag, in an internal buffer (valid until the next call)."""
        x = self._x
        pos = self._pos
        if pos == _BLOCK:
            k = self._k1
        else:
            x[pos] ^= 0x80  # RFC 4493 §2.4 step 4: padding 10^i
            k = self._k2
        for i in range(_BLOCK):
            x[i] ^= k[i]
        self._aes.encrypt(x, x)
        return x

    def cmac(self, data, off=0, n=-1):
        self.cmac_start()
        self.cmac_update(data, off, n)
        return self.cmac_finish()

    # --- LoRaWAN frame blocks ---------------------------------------------------------------

    def _block(self, first, dirn, dev_addr, fcnt, last):
        b = self._blk
        b[0] = first
        b[1] = b[2] = b[3] = b[4] = 0
        b[5] = dirn
        for i in range(4):
            b[6 + i] = (dev_addr >> (8 * i)) & 0xFF
            b[10 + i] = (fcnt >> (8 * i)) & 0xFF
        b[14] = 0
        b[15] = last
        return b

    def frame_mic(self, dirn, dev_addr, fcnt, msg, n):
        """MIC (as a 32-bit int, little-endian on air) of msg[0:n] (MHDR..FRMPayload)."""
        self.cmac_start()
        self.cmac_update(self._block(0x49, dirn, dev_addr, fcnt, n), 0, _BLOCK)
        self.cmac_update(msg, 0, n)
        t = self.cmac_finish()
        return t[0] | (t[1] << 8) | (t[2] << 16) | (t[3] << 24)

    def crypt(self, dirn, dev_addr, fcnt, buf, off, n):
        """Encrypts (or decrypts: XOR) buf[off:off + n] in place with the A_i keystream."""
        s = self._s
        i = 1
        done = 0
        while done < n:
            self._aes.encrypt(self._block(0x01, dirn, dev_addr, fcnt, i), s)
            k = 0
            end = done + _BLOCK if done + _BLOCK < n else n
            for j in range(off + done, off + end):
                buf[j] ^= s[k]
                k += 1
            done = end
            i += 1


def derive_session_keys(app_key, join_nonce, net_id, dev_nonce):
    """(NwkSKey, AppSKey) as bytes, LoRaWAN 1.0.x (§6.2.6). join_nonce, net_id: 3-byte ints,
    dev_nonce: 16-bit int; all little-endian on the block as on air."""
    k = Key(app_key)
    blk = bytearray(_BLOCK)
    for i in range(3):
        blk[1 + i] = (join_nonce >> (8 * i)) & 0xFF
        blk[4 + i] = (net_id >> (8 * i)) & 0xFF
    blk[7] = dev_nonce & 0xFF
    blk[8] = dev_nonce >> 8
    out = []
    for tag in (0x01, 0x02):
        blk[0] = tag
        o = bytearray(_BLOCK)
        k.encrypt_block(blk, o)
        out.append(bytes(o))
    return out[0], out[1]
