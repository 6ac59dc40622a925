# The LoRaWAN L2 1.0.4 class A MAC core, EU868: frames, OTAA, session, MAC commands, ADR.
#
# Copyright (c) the serene-module authors. MIT licence.
# Sources: LoRaWAN L2 1.0.4 (TS001-1.0.4, "the spec"), RP002-1.0.4 regional parameters.
#
# Non-blocking (STYLE.md §1.4): nothing here awaits or sleeps. Every method takes the time
# `now` (ms, the caller's monotonic clock) and returns a plan (Tx: what to send where, and when
# the receive windows open) or a result; device.py is the async wrapper that drives the
# modem. One preallocated frame buffer; a frame is built in it and sent before the next one.
#
# Persistence (store.py records, each replaced atomically):
#   "nonce"   next DevNonce (u16). Reserved, i.e. written as N + 1, *before* the join-request
#             with N is built: a power cut can skip a nonce, never repeat one (§6.2.5).
#   "fcnt"    (session tag, FCntUp reservation limit, next FCntDown). FCntUp values below the
#             limit may be used; when the next one reaches it, limit + _FCNT_BLOCK is written
#             first. After a reboot the session resumes at the limit: at most _FCNT_BLOCK
#             values are skipped, none reused under the same keys. FCntDown is written before a
#             downlink is acted on, so a replay stays refused across reboots.
#   "session" DevAddr, radio parameters, channels, and the session keys *wrapped* by the
#             caller's key wrapper (device.py: the STSAFE's local envelope); never in clear.
# The session tag is the DevNonce of the join that made the session: an "fcnt" record of an
# older session (power cut between the two writes after a join) is not applied to a new one.
import struct
from micropython import const

from drivers.lorawan import FrameRefused, LorawanError, NoChannel, eu868
from drivers.lorawan.crypto import Key, derive_session_keys
from drivers.lorawan.duty import Bands, JoinBackoff

_DEBUG = const(False)

# --- frame layout (§4) ---
_MT_JOIN_REQ = const(0)
_MT_JOIN_ACC = const(1)
_MT_UNC_UP = const(2)
_MT_UNC_DN = const(3)
_MT_CNF_UP = const(4)
_MT_CNF_DN = const(5)
_FC_ADR = const(0x80)
_FC_ADRACKREQ = const(0x40)
_FC_ACK = const(0x20)
_FC_FPENDING = const(0x10)
_FOPTS_MAX = const(15)
_UP = const(0)
_DOWN = const(1)
_JOIN_REQ_LEN = const(23)
_BUF = const(256)  # > the largest PHYPayload: MHDR 1 + M 230 + MIC 4
_FCNT_BLOCK = const(32)  # FCntUp values reserved per flash write
_FCNT_MAX = const(0xFFFFFFFF)
_DEVNONCE_MAX = const(0xFFFF)

# --- MAC command identifiers (§5, table 4) and payload lengths of what the network sends ---
_LINK_CHECK = const(0x02)
_LINK_ADR = const(0x03)
_DUTY_CYCLE = const(0x04)
_RX_PARAM = const(0x05)
_DEV_STATUS = const(0x06)
_NEW_CHANNEL = const(0x07)
_RX_TIMING = const(0x08)
_DL_CHANNEL = const(0x0A)
_DEVICE_TIME = const(0x0D)
# CID -> payload length of the network's command (request or answer), §5 table 4.
_DOWN_LEN = {_LINK_CHECK: 2, _LINK_ADR: 4, _DUTY_CYCLE: 1, _RX_PARAM: 4, _DEV_STATUS: 0,
             _NEW_CHANNEL: 5, _RX_TIMING: 1, _DL_CHANNEL: 4, _DEVICE_TIME: 5}
_ANS_MAX = const(48)  # answers queued for the next uplink (FOpts, or FPort 0 if > 15 bytes)

_SESSION_FMT = "<HIBBBBBBBHI"  # devnonce, devaddr, dr, txp, nbtrans, rx1dro, rx2dr, rxdelay,
_SESSION_HDR = const(22)  # agg_exp, chmask, rx2freq; then 16 freq I, 16 drrange B, 16 dl I
_SESSION_LEN = const(22 + 64 + 16 + 64)


def _dprint(fmt, *args):
    if _DEBUG:
        print("D lorawan:", fmt % args if args else fmt)


def _u32(b, i):
    return b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)


def _u24(b, i):
    return b[i] | (b[i + 1] << 8) | (b[i + 2] << 16)


def _put32(b, i, v):
    for k in range(4):
        b[i + k] = (v >> (8 * k)) & 0xFF


class Tx:
    """A planned transmission: where, how, and the receive windows that follow it."""

    def __init__(self):
        self.join = False
        self.freq = 0
        self.dr = 0
        self.sf = 7
        self.power_dbm = 0
        self.frame = None  # memoryview into the MAC's buffer
        self.toa_ms = 0
        self.band = 0
        self.fcnt = -1
        self.port = -1
        self.confirmed = False
        self.rx1_delay_ms = 0
        self.rx1_freq = 0
        self.rx1_dr = 0
        self.rx2_freq = 0
        self.rx2_dr = 0


class Mac:
    """dev_eui, join_eui: 8 bytes, most significant first (as printed); store: load/save.
    join_dr: the DR of the first join-request (lower DRs are tried after failures);
    battery: callable -> DevStatusAns battery byte (0 external power, 1-254, 255 unknown)."""

    def __init__(self, store, dev_eui, join_eui, *, join_dr=eu868.DR_MAX, adr=True,
                 battery=None, seed=1):
        if len(dev_eui) != 8 or len(join_eui) != 8:
            raise ValueError("EUIs are 8 bytes")
        self.store = store
        self.dev_eui = bytes(dev_eui)
        self.join_eui = bytes(join_eui)
        self.join_dr = join_dr
        self.adr = adr
        self._battery = battery
        self._rng = seed & 0xFFFFFFFF or 1
        self._buf = bytearray(_BUF)
        self._tx = Tx()
        self._ans = bytearray(_ANS_MAX)  # one-shot answers
        self._ans_n = 0
        self._sticky = bytearray(8)  # RXParamSetupAns, RXTimingSetupAns, DlChannelAns
        self._sticky_n = 0
        self.freqs = [0] * eu868.N_CHANNELS
        self.drrange = bytearray(eu868.N_CHANNELS)  # min | max << 4
        self.dl_freqs = [0] * eu868.N_CHANNELS
        self.bands = Bands()
        self.join_backoff = JoinBackoff()
        self.join_attempts = 0
        self.stats = {"joins": 0, "join_requests": 0, "uplinks": 0, "downlinks": 0,
                      "mic": 0, "replay": 0, "address": 0, "malformed": 0, "type": 0,
                      "mac_commands": 0, "mac_unknown": 0, "answers_dropped": 0,
                      "fcnt_writes": 0, "adr_backoff": 0}
        self._join_key = None
        self._join_app_key = None
        self._join_nonce_used = -1
        self._session_keys = None
        self._reset_session()

    # --- state --------------------------------------------------------------------------

    def _reset_session(self):
        self.joined = False
        self.dev_addr = 0
        self.devnonce = -1
        self._nwk = None
        self._app = None
        self.wrapped_keys = None
        for i in range(eu868.N_CHANNELS):
            self.freqs[i] = 0
            self.dl_freqs[i] = 0
            self.drrange[i] = 0
        for i, f in enumerate(eu868.DEFAULT_CHANNELS):
            self.freqs[i] = f
            self.drrange[i] = eu868.DR_MIN | (eu868.DR_MAX << 4)
        self.chmask = (1 << len(eu868.DEFAULT_CHANNELS)) - 1
        self.dr = self.join_dr
        self.tx_power = 0
        self.nb_trans = 1
        self.rx1_dro = 0
        self.rx2_dr = eu868.RX2_DR
        self.rx2_freq = eu868.RX2_FREQ
        self.rx_delay_ms = eu868.RECEIVE_DELAY1_MS
        self.bands.agg_exp = 0
        self.fcnt_up = 0
        self.fcnt_limit = 0
        self.fcnt_down = 0  # next acceptable FCntDown (32 bits)
        self.adr_ack_cnt = 0
        self.ack_pending = False  # a confirmed downlink to acknowledge in the next uplink
        self.acked = False  # the last confirmed uplink was acknowledged
        self.fpending = False
        self.last_snr = 0
        self._ans_n = 0
        self._sticky_n = 0
        self.session_dirty = False

    def _rand(self, n):
        s = self._rng
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        self._rng = s
        return s % n

    def max_payload(self):
        """The largest FRMPayload at the current DR with the answers now pending in FOpts."""
        n = eu868.max_payload(self.dr)
        f = self._fopts_len()
        return n - f if f <= _FOPTS_MAX else n

    def _fopts_len(self):
        return self._ans_n + self._sticky_n

    def _write_fcnt(self):
        self.store.save("fcnt", struct.pack("<HII", self.devnonce, self.fcnt_limit,
                                            self.fcnt_down))
        self.stats["fcnt_writes"] += 1

    # --- join ---------------------------------------------------------------------------

    def _join_dr_now(self):
        # Join DR: join_dr for two attempts, then one lower each two attempts, down to DR0,
        # then back to join_dr (LoRaMac-node alternates DRs in the same spirit).
        d = self.join_dr - (self.join_attempts // 2) % (self.join_dr + 1)
        return d if d > eu868.DR_MIN else eu868.DR_MIN

    def join_wait_ms(self, now):
        """ms until the next join-request may go (join back-off and duty cycle)."""
        toa = eu868.time_on_air_ms(_JOIN_REQ_LEN, self._join_dr_now())
        w = self.join_backoff.wait_ms(now, toa)
        best = None
        for f in eu868.DEFAULT_CHANNELS:
            b = self.bands.wait_ms(eu868.band_of(f), now + w, toa)
            if best is None or b < best:
                best = b
        return w + best

    def _reserve_devnonce(self):
        rec = self.store.load("nonce")
        n = 0 if rec is None else struct.unpack("<H", rec)[0]
        if n > _DEVNONCE_MAX - 1:
            # §6.2.5: a DevNonce is never reused; the device needs a new AppKey.
            raise LorawanError("devnonce exhausted", n)
        self.store.save("nonce", struct.pack("<H", n + 1))
        return n

    def build_join(self, now, app_key):
        """The next join-request (Tx), or NoChannel(wait_ms). app_key: 16 bytes in RAM; kept
        (as an AES key object) only until the join-accept or the next join."""
        w = self.join_wait_ms(now)
        if w > 0:
            raise NoChannel("join back-off", w)
        dr = self._join_dr_now()
        toa = eu868.time_on_air_ms(_JOIN_REQ_LEN, dr)
        free = [f for f in eu868.DEFAULT_CHANNELS
                if self.bands.wait_ms(eu868.band_of(f), now, toa) == 0]
        freq = free[self._rand(len(free))]
        nonce = self._reserve_devnonce()
        key = Key(app_key)
        b = self._buf
        b[0] = _MT_JOIN_REQ << 5
        for i in range(8):
            b[1 + i] = self.join_eui[7 - i]  # EUIs little-endian on air (§6.2.4)
            b[9 + i] = self.dev_eui[7 - i]
        b[17] = nonce & 0xFF
        b[18] = nonce >> 8
        t = key.cmac(b, 0, 19)
        for i in range(4):
            b[19 + i] = t[i]
        self._join_key = key
        self._join_app_key = bytes(app_key)
        self._join_nonce_used = nonce
        self.join_attempts += 1
        self.stats["join_requests"] += 1
        tx = self._tx
        tx.join = True
        tx.freq = freq
        tx.dr = dr
        tx.sf = eu868.sf(dr)
        tx.power_dbm = eu868.tx_power_dbm(0)
        tx.frame = memoryview(b)[:_JOIN_REQ_LEN]
        tx.toa_ms = toa
        tx.band = eu868.band_of(freq)
        tx.fcnt = nonce
        tx.port = -1
        tx.confirmed = False
        tx.rx1_delay_ms = eu868.JOIN_ACCEPT_DELAY1_MS
        tx.rx1_freq = freq
        tx.rx1_dr = eu868.rx1_dr(dr, 0)
        tx.rx2_freq = eu868.RX2_FREQ
        tx.rx2_dr = eu868.RX2_DR
        _dprint("join-request devnonce %d dr %d %d Hz", nonce, dr, freq)
        return tx

    def on_join_accept(self, buf, n):
        """Decrypts and checks a join-accept in buf[0:n] (in place). On success the new
        session is installed (session_dirty: the caller wraps the keys and calls
        save_session) and True is returned; raises FrameRefused otherwise."""
        key = self._join_key
        if key is None:
            raise FrameRefused("type", "no join pending")
        if n not in (17, 33) or buf[0] != _MT_JOIN_ACC << 5:
            self.stats["malformed"] += 1
            raise FrameRefused("malformed", n)
        blk = memoryview(buf)
        for off in range(1, n, 16):
            key.encrypt_block(blk[off:off + 16], blk[off:off + 16])
        t = key.cmac(buf, 0, n - 4)
        for i in range(4):
            if t[i] != buf[n - 4 + i]:
                self.stats["mic"] += 1
                raise FrameRefused("mic", "join-accept")
        join_nonce = _u24(buf, 1)
        net_id = _u24(buf, 4)
        dev_addr = _u32(buf, 7)
        dl = buf[11]
        rx_delay = buf[12] & 0x0F
        cflist = []
        if n == 33 and buf[28] == 0:  # CFListType 0: five frequencies (RP002 §2.2.5)
            for k in range(5):
                cflist.append(_u24(buf, 13 + 3 * k) * 100)
        nwk, app = derive_session_keys(self._app_key_bytes(), join_nonce, net_id,
                                       self._join_nonce_used)
        nonce = self._join_nonce_used
        self._reset_session()
        self.devnonce = nonce
        self.dev_addr = dev_addr
        self._nwk = Key(nwk)
        self._app = Key(app)
        self._session_keys = nwk + app
        self.rx1_dro = (dl >> 4) & 0x07
        if self.rx1_dro > eu868.RX1_DRO_MAX:
            self.rx1_dro = 0
        self.rx2_dr = dl & 0x0F if dl & 0x0F <= eu868.DR_MAX else eu868.RX2_DR
        self.rx_delay_ms = (rx_delay or 1) * 1000
        for k, f in enumerate(cflist):
            ch = len(eu868.DEFAULT_CHANNELS) + k
            if f and eu868.band_of(f) >= 0:
                self.freqs[ch] = f
                self.drrange[ch] = eu868.DR_MIN | (eu868.DR_MAX << 4)
                self.chmask |= 1 << ch
        self.joined = True
        self.join_attempts = 0
        self.join_backoff.reset()
        self._join_key = None
        self._join_app_key = None
        self.session_dirty = True
        self.stats["joins"] += 1
        _dprint("joined devaddr %08x", dev_addr)
        return True

    def _app_key_bytes(self):
        k = self._join_app_key
        if k is None:
            raise LorawanError("no app key")
        return k

    def session_keys(self):
        """NwkSKey || AppSKey (32 bytes, clear, RAM) for the caller to wrap once per join;
        dropped from the MAC once wrapped_keys is set."""
        return self._session_keys

    def set_wrapped_keys(self, wrapped):
        self.wrapped_keys = bytes(wrapped)
        self._session_keys = None

    def save_session(self):
        """Writes "session" (wrapped keys; nothing if there are none: the session then does not
        survive a reboot) and the FCnt record."""
        if self.wrapped_keys is not None:
            rec = bytearray(_SESSION_LEN)
            struct.pack_into(_SESSION_FMT, rec, 0, self.devnonce, self.dev_addr, self.dr,
                             self.tx_power, self.nb_trans, self.rx1_dro, self.rx2_dr,
                             self.rx_delay_ms // 1000, self.bands.agg_exp, self.chmask,
                             self.rx2_freq)
            for i in range(eu868.N_CHANNELS):
                struct.pack_into("<I", rec, _SESSION_HDR + 4 * i, self.freqs[i])
                rec[_SESSION_HDR + 64 + i] = self.drrange[i]
                struct.pack_into("<I", rec, _SESSION_HDR + 80 + 4 * i, self.dl_freqs[i])
            self.store.save("session", bytes(rec) + self.wrapped_keys)
        self._write_fcnt()
        self.session_dirty = False

    def load_session(self):
        """(record, wrapped keys) from the store, or None."""
        rec = self.store.load("session")
        if rec is None or len(rec) <= _SESSION_LEN:
            return None
        return rec, rec[_SESSION_LEN:]

    def restore_session(self, rec, keys):
        """Resumes the stored session with the unwrapped keys (32 bytes)."""
        v = struct.unpack_from(_SESSION_FMT, rec, 0)
        self._reset_session()
        (self.devnonce, self.dev_addr, self.dr, self.tx_power, self.nb_trans, self.rx1_dro,
         self.rx2_dr, rxd, self.bands.agg_exp, self.chmask, self.rx2_freq) = v
        self.rx_delay_ms = rxd * 1000
        for i in range(eu868.N_CHANNELS):
            self.freqs[i] = struct.unpack_from("<I", rec, _SESSION_HDR + 4 * i)[0]
            self.drrange[i] = rec[_SESSION_HDR + 64 + i]
            self.dl_freqs[i] = struct.unpack_from("<I", rec, _SESSION_HDR + 80 + 4 * i)[0]
        self._nwk = Key(keys[:16])
        self._app = Key(keys[16:32])
        self.wrapped_keys = bytes(rec[_SESSION_LEN:])
        f = self.store.load("fcnt")
        if f is not None:
            tag, limit, down = struct.unpack("<HII", f)
            if tag == self.devnonce:
                self.fcnt_up = self.fcnt_limit = limit
                self.fcnt_down = down
        self.joined = True
        return True

    def forget_session(self):
        self.store.remove("session")
        self._reset_session()

    # --- uplink -------------------------------------------------------------------------

    def _channels_for(self, dr):
        out = []
        for i in range(eu868.N_CHANNELS):
            if self.chmask >> i & 1 and self.freqs[i]:
                r = self.drrange[i]
                if (r & 0x0F) <= dr <= (r >> 4):
                    out.append(i)
        return out

    def uplink_wait_ms(self, now, n):
        """ms until an uplink with an n-byte FRMPayload may go at the current DR."""
        toa = eu868.time_on_air_ms(13 + self._fopts_len() + n, self.dr)
        best = None
        for ch in self._channels_for(self.dr):
            w = self.bands.wait_ms(eu868.band_of(self.freqs[ch]), now, toa)
            if best is None or w < best:
                best = w
        if best is None:
            raise LorawanError("no channel for dr", self.dr)
        return best

    def build_uplink(self, now, port, data, confirmed=False):
        """The uplink of `data` on `port` (1..223), with pending MAC answers in FOpts. Raises
        LorawanError("not joined" / "too long" / "fcnt exhausted") or NoChannel(wait_ms).
        port 0 sends the pending answers alone (data ignored)."""
        if not self.joined:
            raise LorawanError("not joined")
        if self.fcnt_up > _FCNT_MAX:
            raise LorawanError("fcnt exhausted", self.fcnt_up)  # §4.3.1.5: rejoin
        dr = self.dr
        nmax = eu868.max_payload(dr)
        fo = self._fopts_len()
        if port == 0:
            data = None
            plen = fo
            fo_in = 0
        else:
            if not 1 <= port <= 223:
                raise ValueError("port")
            plen = len(data)
            if plen > nmax:
                raise LorawanError("too long", (plen, nmax))
            fo_in = fo if fo <= _FOPTS_MAX and plen + fo <= nmax else 0
        phy = 1 + 7 + fo_in + 1 + plen + 4
        if port != 0 and plen == 0:
            phy -= 1  # no FPort without payload
        toa = eu868.time_on_air_ms(phy, dr)
        chans = []
        wait = None
        for ch in self._channels_for(dr):
            w = self.bands.wait_ms(eu868.band_of(self.freqs[ch]), now, toa)
            if w == 0:
                chans.append(ch)
            elif wait is None or w < wait:
                wait = w
        if not chans:
            if wait is None:
                raise LorawanError("no channel for dr", dr)
            raise NoChannel("duty cycle", wait)
        ch = chans[self._rand(len(chans))]
        if self.fcnt_up >= self.fcnt_limit:
            # Reserve the next block before using any value of it (see the header).
            self.fcnt_limit = self.fcnt_up + _FCNT_BLOCK
            self._write_fcnt()
        fcnt = self.fcnt_up
        b = self._buf
        b[0] = (_MT_CNF_UP if confirmed else _MT_UNC_UP) << 5
        _put32(b, 1, self.dev_addr)
        fctrl = fo_in
        if self.adr:
            fctrl |= _FC_ADR
            if self.adr_ack_cnt >= eu868.ADR_ACK_LIMIT:
                fctrl |= _FC_ADRACKREQ
        if self.ack_pending:
            fctrl |= _FC_ACK
        b[5] = fctrl
        b[6] = fcnt & 0xFF
        b[7] = (fcnt >> 8) & 0xFF
        i = 8
        if fo_in:
            i = self._put_answers(b, i)
        if port == 0:
            b[i] = 0
            i += 1
            start = i
            i = self._put_answers(b, i)
            self._nwk.crypt(_UP, self.dev_addr, fcnt, b, start, plen)
        elif plen:
            b[i] = port
            i += 1
            b[i:i + plen] = data
            self._app.crypt(_UP, self.dev_addr, fcnt, b, i, plen)
            i += plen
        mic = self._nwk.frame_mic(_UP, self.dev_addr, fcnt, b, i)
        _put32(b, i, mic)
        i += 4
        self.fcnt_up = fcnt + 1
        self.ack_pending = False
        self.acked = False
        if fo_in or port == 0:
            self._ans_n = 0  # one-shot answers go once; sticky ones until a downlink
        self.stats["uplinks"] += 1
        self._adr_backoff()
        tx = self._tx
        tx.join = False
        tx.freq = self.freqs[ch]
        tx.dr = dr
        tx.sf = eu868.sf(dr)
        tx.power_dbm = eu868.tx_power_dbm(self.tx_power)
        tx.frame = memoryview(b)[:i]
        tx.toa_ms = eu868.time_on_air_ms(i, dr)
        tx.band = eu868.band_of(tx.freq)
        tx.fcnt = fcnt
        tx.port = port
        tx.confirmed = confirmed
        tx.rx1_delay_ms = self.rx_delay_ms
        tx.rx1_freq = self.dl_freqs[ch] or tx.freq
        tx.rx1_dr = eu868.rx1_dr(dr, self.rx1_dro)
        tx.rx2_freq = self.rx2_freq
        tx.rx2_dr = self.rx2_dr
        return tx

    def retransmit(self, now):
        """The same frame again (NbTrans repetition, same FCnt) on a channel free now, or
        NoChannel(wait_ms)."""
        tx = self._tx
        wait = None
        chans = []
        for ch in self._channels_for(tx.dr):
            w = self.bands.wait_ms(eu868.band_of(self.freqs[ch]), now, tx.toa_ms)
            if w == 0:
                chans.append(ch)
            elif wait is None or w < wait:
                wait = w
        if not chans:
            raise NoChannel("duty cycle", wait or 0)
        ch = chans[self._rand(len(chans))]
        tx.freq = self.freqs[ch]
        tx.band = eu868.band_of(tx.freq)
        tx.rx1_freq = self.dl_freqs[ch] or tx.freq
        return tx

    def _put_answers(self, b, i):
        for k in range(self._sticky_n):
            b[i] = self._sticky[k]
            i += 1
        for k in range(self._ans_n):
            b[i] = self._ans[k]
            i += 1
        return i

    def answers_need_port0(self):
        """True when the pending answers no longer fit in FOpts (> 15 bytes)."""
        return self._fopts_len() > _FOPTS_MAX

    def tx_done(self, tx, start):
        """The transmission of tx started at `start` (ms): charge the duty cycle."""
        self.bands.charge(tx.band, start, tx.toa_ms)
        if tx.join:
            self.join_backoff.charge(start, tx.toa_ms)

    def _adr_backoff(self):
        # §4.3.1.1: ADR_ACK_CNT counts uplinks since the last downlink. From ADR_ACK_LIMIT
        # on, ADRACKReq is set; each ADR_ACK_DELAY more without a downlink, first the power
        # goes to maximum, then the DR steps down, and at DR0 the default channels come back.
        self.adr_ack_cnt += 1
        if not self.adr:
            return
        c = self.adr_ack_cnt - eu868.ADR_ACK_LIMIT
        if c < eu868.ADR_ACK_DELAY or c % eu868.ADR_ACK_DELAY:
            return
        self.stats["adr_backoff"] += 1
        if self.tx_power:
            self.tx_power = 0
        elif self.dr > eu868.DR_MIN:
            self.dr -= 1
        else:
            self.chmask |= (1 << len(eu868.DEFAULT_CHANNELS)) - 1
        self.session_dirty = True

    # --- downlink -----------------------------------------------------------------------

    def _refuse(self, reason, detail=None):
        self.stats[reason] += 1
        raise FrameRefused(reason, detail)

    def on_downlink(self, buf, n, snr=0):
        """Checks and decrypts (in place) a data downlink in buf[0:n]. Returns (port,
        payload memoryview) or (None, None) when there is no FRMPayload for the application
        (MAC commands only, or an empty frame). Raises FrameRefused ("malformed", "type",
        "address", "mic", "replay"); the FCntDown record is written before anything is
        acted on."""
        if not self.joined:
            self._refuse("type", "not joined")
        if n < 12:
            self._refuse("malformed", n)
        mhdr = buf[0]
        mtype = mhdr >> 5
        if mhdr & 0x03 or mtype not in (_MT_UNC_DN, _MT_CNF_DN):
            self._refuse("type", mhdr)
        addr = _u32(buf, 1)
        if addr != self.dev_addr:
            self._refuse("address", addr)
        fctrl = buf[5]
        folen = fctrl & 0x0F
        f16 = buf[6] | (buf[7] << 8)
        end = n - 4
        pos = 8 + folen
        if pos > end:
            self._refuse("malformed", "fopts")
        nxt = self.fcnt_down
        cand = (nxt & ~0xFFFF) | f16
        if cand < nxt:
            cand += 0x10000
        mic = _u32(buf, end)
        if cand > _FCNT_MAX or self._nwk.frame_mic(_DOWN, addr, cand, buf, end) != mic:
            old = cand - 0x10000
            if old >= 0 and self._nwk.frame_mic(_DOWN, addr, old, buf, end) == mic:
                self._refuse("replay", old)
            self._refuse("mic", cand)
        port = None
        if pos < end:
            port = buf[pos]
            if port == 0 and folen:
                self._refuse("malformed", "fopts with port 0")
        # Accepted: commit FCntDown before acting on the frame.
        self.fcnt_down = cand + 1
        self._write_fcnt()
        self.stats["downlinks"] += 1
        self.last_snr = snr
        self.adr_ack_cnt = 0
        self._sticky_n = 0  # a class A downlink: sticky answers were received
        self.ack_pending = mtype == _MT_CNF_DN
        if fctrl & _FC_ACK:
            self.acked = True
        self.fpending = bool(fctrl & _FC_FPENDING)
        if folen:
            self._commands(buf, 8, 8 + folen, snr)
        if port is None:
            return None, None
        start = pos + 1
        if port == 0:
            self._nwk.crypt(_DOWN, addr, cand, buf, start, end - start)
            self._commands(buf, start, end, snr)
            return None, None
        self._app.crypt(_DOWN, addr, cand, buf, start, end - start)
        return port, memoryview(buf)[start:end]

    # --- MAC commands (§5) --------------------------------------------------------------

    def _answer(self, *octets):
        if self._ans_n + len(octets) > _ANS_MAX:
            self.stats["answers_dropped"] += 1
            return
        for o in octets:
            self._ans[self._ans_n] = o
            self._ans_n += 1

    def _sticky_answer(self, cid, status):
        # One of each kind: a newer request replaces the pending answer to the older one.
        s = self._sticky
        i = 0
        while i < self._sticky_n:
            c = s[i]
            ln = 1 if c == _RX_TIMING else 2
            if c == cid:
                s[i:self._sticky_n - ln] = s[i + ln:self._sticky_n]
                self._sticky_n -= ln
                break
            i += ln
        s[self._sticky_n] = cid
        self._sticky_n += 1
        if cid != _RX_TIMING:
            s[self._sticky_n] = status
            self._sticky_n += 1

    def _commands(self, b, i, end, snr):
        while i < end:
            cid = b[i]
            ln = _DOWN_LEN.get(cid)
            if ln is None:
                # §5: an unknown command ends processing (its length is unknown).
                self.stats["mac_unknown"] += 1
                return
            if i + 1 + ln > end:
                self.stats["malformed"] += 1
                return
            self.stats["mac_commands"] += 1
            p = i + 1
            if cid == _LINK_ADR:
                j = i
                while j + 5 <= end and b[j] == _LINK_ADR:
                    j += 5
                self._link_adr(b, i, j)
                i = j
                continue
            if cid == _DUTY_CYCLE:
                self.bands.agg_exp = b[p] & 0x0F
                self._answer(_DUTY_CYCLE)
                self.session_dirty = True
            elif cid == _RX_PARAM:
                self._rx_param(b, p)
            elif cid == _DEV_STATUS:
                bat = 255 if self._battery is None else self._battery()
                m = int(snr)
                m = -32 if m < -32 else (31 if m > 31 else m)
                self._answer(_DEV_STATUS, bat & 0xFF, m & 0x3F)
            elif cid == _NEW_CHANNEL:
                self._new_channel(b, p)
            elif cid == _RX_TIMING:
                d = b[p] & 0x0F
                self.rx_delay_ms = (d or 1) * 1000
                self._sticky_answer(_RX_TIMING, 0)
                self.session_dirty = True
            elif cid == _DL_CHANNEL:
                idx = b[p]
                f = _u24(b, p + 1) * 100
                st = 0
                if eu868.FREQ_MIN <= f <= eu868.FREQ_MAX:
                    st |= 1
                if idx < eu868.N_CHANNELS and self.freqs[idx]:
                    st |= 2
                if st == 3:
                    self.dl_freqs[idx] = f
                    self.session_dirty = True
                self._sticky_answer(_DL_CHANNEL, st)
            # _LINK_CHECK / _DEVICE_TIME answers: nothing asked them here; parsed and ignored
            i = p + ln

    def _link_adr(self, b, i, j):
        # A contiguous block of LinkADRReq is applied atomically (§5.3, RP002 §2.2.5 for
        # EU868 ChMaskCntl): the channel masks in order, DR / TXPower / NbTrans of the last;
        # one LinkADRAns per request, all with the same status; nothing applied on a NACK.
        mask = self.chmask
        ok_mask = True
        for k in range(i, j, 5):
            cm = b[k + 2] | (b[k + 3] << 8)
            cntl = (b[k + 4] >> 4) & 0x07
            if cntl == 0:
                mask = cm
            elif cntl == 6:
                mask = 0
                for ch in range(eu868.N_CHANNELS):
                    if self.freqs[ch]:
                        mask |= 1 << ch
            else:
                ok_mask = False
        last = j - 5
        dr = b[last + 1] >> 4
        txp = b[last + 1] & 0x0F
        nb = b[last + 4] & 0x0F
        for ch in range(eu868.N_CHANNELS):
            if mask >> ch & 1 and not self.freqs[ch]:
                ok_mask = False
        if not mask:
            ok_mask = False
        ok_dr = True
        new_dr = self.dr if dr == 0x0F else dr
        if new_dr > eu868.DR_MAX:
            ok_dr = False
        else:
            ok_dr = False
            for ch in range(eu868.N_CHANNELS):
                r = self.drrange[ch]
                if mask >> ch & 1 and self.freqs[ch] and (r & 0x0F) <= new_dr <= (r >> 4):
                    ok_dr = True
        ok_pw = txp == 0x0F or txp <= eu868.TX_POWER_MAX_INDEX
        status = (4 if ok_pw else 0) | (2 if ok_dr else 0) | (1 if ok_mask else 0)
        if status == 7:
            self.chmask = mask
            self.dr = new_dr
            if txp != 0x0F:
                self.tx_power = txp
            self.nb_trans = nb or 1
            self.session_dirty = True
        for _ in range(i, j, 5):
            self._answer(_LINK_ADR, status)

    def _rx_param(self, b, p):
        dl = b[p]
        f = _u24(b, p + 1) * 100
        dro = (dl >> 4) & 0x07
        rx2 = dl & 0x0F
        st = 0
        if eu868.FREQ_MIN <= f <= eu868.FREQ_MAX:
            st |= 1
        if rx2 <= eu868.DR_MAX:
            st |= 2
        if dro <= eu868.RX1_DRO_MAX:
            st |= 4
        if st == 7:
            self.rx1_dro = dro
            self.rx2_dr = rx2
            self.rx2_freq = f
            self.session_dirty = True
        self._sticky_answer(_RX_PARAM, st)

    def _new_channel(self, b, p):
        idx = b[p]
        f = _u24(b, p + 1) * 100
        lo = b[p + 4] & 0x0F
        hi = b[p + 4] >> 4
        ok_f = idx >= len(eu868.DEFAULT_CHANNELS) and idx < eu868.N_CHANNELS and (
            f == 0 or (eu868.FREQ_MIN <= f <= eu868.FREQ_MAX and eu868.band_of(f) >= 0))
        ok_dr = lo <= hi <= eu868.DR_MAX
        if ok_f and ok_dr:
            if f == 0:
                self.freqs[idx] = 0
                self.chmask &= ~(1 << idx)
            else:
                self.freqs[idx] = f
                self.drrange[idx] = lo | (hi << 4)
                self.chmask |= 1 << idx
            self.session_dirty = True
        self._answer(_NEW_CHANNEL, (2 if ok_dr else 0) | (1 if ok_f else 0))
