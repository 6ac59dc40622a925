# Drives the LoRaWAN MAC core (drivers/lorawan/mac.py) from JSON commands on stdin, one per
# line, and prints one JSON answer per line: the host test (tests/test_lora_frames.py) compares
# the frames with a reference it builds from the specification with `cryptography`.
import json
import struct
import sys
from binascii import hexlify, unhexlify

from drivers.lorawan import FrameRefused, LorawanError
from drivers.lorawan.crypto import Key
from drivers.lorawan.mac import Mac
from drivers.lorawan.store import RamStore


def h(b):
    return hexlify(bytes(b)).decode()


mac = None
store = RamStore()
for line in sys.stdin:
    if not line.strip():
        continue
    c = json.loads(line)
    op = c["op"]
    out = {}
    try:
        if op == "join_request":
            mac = Mac(store, unhexlify(c["dev_eui"]), unhexlify(c["join_eui"]), seed=3)
            store.save("nonce", struct.pack("<H", c["dev_nonce"]))
            tx = mac.build_join(0, unhexlify(c["app_key"]))
            out = {"frame": h(tx.frame), "freq": tx.freq, "dr": tx.dr}
        elif op == "join_accept":
            f = bytearray(unhexlify(c["frame"]))
            mac.on_join_accept(f, len(f))
            out = {"dev_addr": mac.dev_addr, "nwk": h(mac.session_keys()[:16]),
                   "app": h(mac.session_keys()[16:]), "freqs": mac.freqs,
                   "rx1_dro": mac.rx1_dro, "rx2_dr": mac.rx2_dr, "rx_delay": mac.rx_delay_ms,
                   "chmask": mac.chmask}
        elif op == "session":
            mac = Mac(RamStore(), bytes(8), bytes(8), adr=c.get("adr", True), seed=3)
            mac.joined = True
            mac.devnonce = 1
            mac.dev_addr = c["dev_addr"]
            mac._nwk = Key(unhexlify(c["nwk"]))
            mac._app = Key(unhexlify(c["app"]))
            mac.fcnt_up = mac.fcnt_limit = c.get("fcnt_up", 0)
            mac.fcnt_down = c.get("fcnt_down", 0)
            mac.dr = c.get("dr", 5)
        elif op == "answers":
            a = unhexlify(c["data"])
            mac._ans[:len(a)] = a
            mac._ans_n = len(a)
        elif op == "uplink":
            tx = mac.build_uplink(c.get("now", 0), c["port"], unhexlify(c.get("data", "")),
                                  c.get("confirmed", False))
            out = {"frame": h(tx.frame), "fcnt": tx.fcnt}
        elif op == "downlink":
            f = bytearray(unhexlify(c["frame"]))
            port, payload = mac.on_downlink(f, len(f), c.get("snr", 0))
            out = {"port": port, "data": h(payload) if payload is not None else None,
                   "fcnt_down": mac.fcnt_down, "answers": h(mac._sticky[:mac._sticky_n])
                   + h(mac._ans[:mac._ans_n]), "ack_pending": mac.ack_pending,
                   "dr": mac.dr, "tx_power": mac.tx_power}
    except FrameRefused as e:
        out = {"refused": e.reason}
    except LorawanError as e:
        out = {"error": e.reason}
    print(json.dumps(out))
