"""LoRaWAN frames built and parsed by the module's MAC (drivers/lorawan on the MicroPython unix
port) against a reference written here from the specification (LoRaWAN L2 1.0.4 §4, §6.2;
RP002-1.0.4 §2.2.5 CFList) with `cryptography`'s AES and CMAC, byte for byte:
uplink, downlink, FPort 0 (MAC commands in FRMPayload), FOpts, the 32-bit FCnt across the
16-bit rollover, join-request, join-accept (with CFList) and the session keys; plus the
published example of the lora-packet library (github.com/anthonykirby/lora-packet README:
"40F17DBE4900020001954378762B11FF0D", NwkSKey 44024241..., AppSKey ec925802..., payload
"test"). Frames with a wrong MIC or a replayed FCntDown are refused by the module.
"""

import json
import os
import random
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

APP_KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
DEV_EUI = "0004a30b001c0530"
JOIN_EUI = "70b3d57ed0000000"


# --- the reference, from the specification -------------------------------------------------

def aes_enc(key, block):
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()


def aes_dec(key, data):
    d = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    return d.update(data) + d.finalize()


def cmac(key, data):
    c = CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def crypt(key, dirn, addr, fcnt, data):
    """§4.3.3: FRMPayload XOR AES(K, A_i), i = 1.."""
    out = bytearray()
    for i in range((len(data) + 15) // 16):
        a = bytes([1, 0, 0, 0, 0, dirn]) + struct.pack("<II", addr, fcnt) + bytes([0, i + 1])
        s = aes_enc(key, a)
        out += bytes(x ^ y for x, y in zip(data[16 * i:16 * i + 16], s))
    return bytes(out)


def mic(key, dirn, addr, fcnt, msg):
    """§4.4: cmac(NwkSKey, B0 | msg)[0:4]."""
    b0 = bytes([0x49, 0, 0, 0, 0, dirn]) + struct.pack("<II", addr, fcnt) + bytes([0, len(msg)])
    return cmac(key, b0 + msg)[:4]


def data_frame(mtype, nwk, app, addr, fcnt, fctrl, fopts=b"", port=None, payload=b""):
    dirn = 0 if mtype in (2, 4) else 1
    msg = bytes([mtype << 5]) + struct.pack("<I", addr) + bytes([fctrl | len(fopts)])
    msg += struct.pack("<H", fcnt & 0xFFFF) + fopts
    if port is not None:
        msg += bytes([port]) + crypt(nwk if port == 0 else app, dirn, addr, fcnt, payload)
    return msg + mic(nwk, dirn, addr, fcnt, msg)


def join_request(app_key, join_eui, dev_eui, nonce):
    msg = b"\x00" + bytes.fromhex(join_eui)[::-1] + bytes.fromhex(dev_eui)[::-1]
    msg += struct.pack("<H", nonce)
    return msg + cmac(app_key, msg)[:4]


def join_accept(app_key, join_nonce, net_id, addr, dl, rx_delay, cflist=None):
    msg = b"\x20" + struct.pack("<I", join_nonce)[:3] + struct.pack("<I", net_id)[:3]
    msg += struct.pack("<IBB", addr, dl, rx_delay)
    if cflist is not None:
        msg += b"".join(struct.pack("<I", f // 100)[:3] for f in cflist) + b"\x00"
    body = msg[1:] + cmac(app_key, msg)[:4]
    return msg[:1] + aes_dec(app_key, body)  # §6.2.6: the server decrypts


def session_keys(app_key, join_nonce, net_id, dev_nonce):
    tail = struct.pack("<I", join_nonce)[:3] + struct.pack("<I", net_id)[:3]
    tail += struct.pack("<H", dev_nonce) + bytes(7)
    return aes_enc(app_key, b"\x01" + tail), aes_enc(app_key, b"\x02" + tail)


# --- driving the module's MAC -----------------------------------------------------------

def run(upy, cmds):
    text = "".join(json.dumps(c) + "\n" for c in cmds)
    res = upy.run(["tests/upy/lorawan_frames.py"], input=text)
    outs = [json.loads(x) for x in res.stdout.splitlines()]
    assert len(outs) == len(cmds), res.stdout + res.stderr
    return outs


def test_join_request_and_join_accept_with_cflist(upy):
    cflist = [867_100_000, 867_300_000, 867_500_000, 867_700_000, 867_900_000]
    ja = join_accept(APP_KEY, 0x00A1B2, 0x000013, 0x260B5678, 0x13, 2, cflist)
    out = run(upy, [
        {"op": "join_request", "app_key": APP_KEY.hex(), "dev_eui": DEV_EUI,
         "join_eui": JOIN_EUI, "dev_nonce": 0x0102},
        {"op": "join_accept", "frame": ja.hex()},
    ])
    assert out[0]["frame"] == join_request(APP_KEY, JOIN_EUI, DEV_EUI, 0x0102).hex()
    nwk, app = session_keys(APP_KEY, 0x00A1B2, 0x000013, 0x0102)
    a = out[1]
    assert (a["nwk"], a["app"]) == (nwk.hex(), app.hex())
    assert a["dev_addr"] == 0x260B5678
    assert a["freqs"][:8] == [868_100_000, 868_300_000, 868_500_000] + cflist
    assert (a["rx1_dro"], a["rx2_dr"], a["rx_delay"], a["chmask"]) == (1, 3, 2000, 0xFF)


def test_join_accept_without_cflist_and_with_a_wrong_mic(upy):
    good = join_accept(APP_KEY, 7, 0x13, 0x01020304, 0, 1)
    bad = bytearray(good)
    bad[5] ^= 0x40
    other = join_accept(bytes(16), 7, 0x13, 0x01020304, 0, 1)  # another AppKey
    cmds = [{"op": "join_request", "app_key": APP_KEY.hex(), "dev_eui": DEV_EUI,
             "join_eui": JOIN_EUI, "dev_nonce": 9}]
    out = run(upy, cmds + [{"op": "join_accept", "frame": bad.hex()},
                           {"op": "join_accept", "frame": other.hex()},
                           {"op": "join_accept", "frame": good.hex()}])
    assert out[1] == {"refused": "mic"} and out[2] == {"refused": "mic"}
    assert out[3]["dev_addr"] == 0x01020304 and out[3]["freqs"][3:] == [0] * 13
    nwk, _ = session_keys(APP_KEY, 7, 0x13, 9)
    assert out[3]["nwk"] == nwk.hex()


def test_published_lora_packet_example(upy):
    nwk = "44024241ed4ce9a68c6a8bc055233fd3"
    app = "ec925802ae430ca77fd3dd73cb2cc588"
    want = "40f17dbe4900020001954378762b11ff0d"
    assert data_frame(2, bytes.fromhex(nwk), bytes.fromhex(app), 0x49BE7DF1, 2, 0, b"", 1,
                      b"test").hex() == want
    out = run(upy, [{"op": "session", "dev_addr": 0x49BE7DF1, "nwk": nwk, "app": app,
                     "fcnt_up": 2, "adr": False},
                    {"op": "uplink", "port": 1, "data": b"test".hex()}])
    assert out[1]["frame"] == want


def test_uplinks_fopts_port0_and_fcnt_rollover(upy):
    rng = random.Random(9)
    nwk, app = os.urandom(16), os.urandom(16)
    addr = 0x26011BDA
    cmds = [{"op": "session", "dev_addr": addr, "nwk": nwk.hex(), "app": app.hex(),
             "fcnt_up": 0xFFFD}]
    want = []
    fcnt = 0xFFFD
    for i in range(8):  # FCnt 0xFFFD .. 0x10004: the on-air 16 bits roll over
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        answers = b""
        if i % 3 == 1:
            answers = b"\x03\x07\x06\xff\x0a"  # LinkADRAns, DevStatusAns: in FOpts
            cmds.append({"op": "answers", "data": answers.hex()})
        confirmed = i == 5
        cmds.append({"op": "uplink", "port": 10 + i, "data": payload.hex(),
                     "confirmed": confirmed})
        want.append(data_frame(4 if confirmed else 2, nwk, app, addr, fcnt, 0x80, answers,
                               10 + i, payload))
        fcnt += 1
    # Answers too long for FOpts (> 15 bytes) go alone in FPort 0, encrypted with NwkSKey.
    long_answers = b"\x07\x03" * 8 + b"\x03\x07"
    cmds += [{"op": "answers", "data": long_answers.hex()}, {"op": "uplink", "port": 0}]
    want.append(data_frame(2, nwk, app, addr, fcnt, 0x80, b"", 0, long_answers))
    out = [o for o in run(upy, cmds) if "frame" in o]
    assert [o["frame"] for o in out] == [w.hex() for w in want]
    assert [o["fcnt"] for o in out] == list(range(0xFFFD, 0xFFFD + 9))
    assert bytes.fromhex(out[3]["frame"])[6:8] == b"\x00\x00"  # 0x10000 on air


def test_downlinks_port0_fopts_rollover_replay_and_wrong_mic(upy):
    nwk, app = os.urandom(16), os.urandom(16)
    addr = 0x260B0001
    s = {"op": "session", "dev_addr": addr, "nwk": nwk.hex(), "app": app.hex(),
         "fcnt_down": 0xFFFE}

    def dl(fcnt, **kw):
        return {"op": "downlink", "frame": data_frame(kw.pop("mtype", 3), nwk, app, addr, fcnt,
                                                       **kw).hex()}

    linkadr = b"\x03\x32\x07\x00\x01"  # DR3, TXPower 2, ch 0-2, NbTrans 1
    devstatus = b"\x06"
    forged = bytearray(data_frame(3, nwk, app, addr, 0x10001, 0, b"", 10, b"x"))
    forged[-2] ^= 0x01
    out = run(upy, [
        s,
        dl(0xFFFE, fctrl=0, port=10, payload=b"first"),
        dl(0x10000, fctrl=0, fopts=linkadr, port=11, payload=b"second"),  # 16-bit rollover
        dl(0x10001, fctrl=0, port=0, payload=devstatus, mtype=5),  # confirmed, FPort 0
        {"op": "downlink", "frame": forged.hex()},
        dl(0x10000, fctrl=0, port=11, payload=b"second"),  # replay
        dl(0xFFFF, fctrl=0, port=10, payload=b"old"),  # older than the last accepted
        {"op": "downlink", "frame": data_frame(3, nwk, app, addr ^ 1, 0x10002, 0, b"", 1,
                                               b"z").hex()},
        dl(0x10005, fctrl=0, port=12, payload=b"gap ok"),
    ])
    assert out[1]["port"] == 10 and bytes.fromhex(out[1]["data"]) == b"first"
    assert out[2]["port"] == 11 and bytes.fromhex(out[2]["data"]) == b"second"
    assert out[2]["fcnt_down"] == 0x10001 and (out[2]["dr"], out[2]["tx_power"]) == (3, 2)
    assert out[2]["answers"] == "0307"
    assert out[3]["port"] is None and out[3]["ack_pending"] is True
    assert out[3]["answers"].startswith("0307") and out[3]["answers"][4:6] == "06"
    assert out[4] == {"refused": "mic"}
    assert out[5] == {"refused": "replay"}
    assert out[6]["refused"] in ("replay", "mic")
    assert out[7] == {"refused": "address"}
    assert out[8]["port"] == 12 and out[8]["fcnt_down"] == 0x10006
