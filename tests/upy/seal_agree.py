# Runs the firmware's CBOR and crypto on cases written by a host test (one case a line,
# fields in hex, space separated) and prints one result line per case, in order:
#   micropython seal_agree.py KIND CASEFILE
#   cbor      DATA                  -> hex(encode(decode(DATA))) | ERR reason
#   ccm_seal  KEY NONCE AAD PT      -> hex(ciphertext || tag)
#   ccm_open  KEY NONCE AAD CT      -> hex(plaintext) | ERR reason
#   hmac      KEY MSG               -> hex(HMAC-SHA256)
#   hkdf      SALT IKM INFO LEN     -> hex(OKM)      (LEN in decimal)
import sys
from binascii import hexlify, unhexlify

from firmware import cbor
from firmware.crypto import hkdf
from firmware.crypto.aes_ccm import AesCcm, CcmError


def _h(b):
    return hexlify(b).decode()


def _case(kind, f):
    if kind == "cbor":
        try:
            return _h(cbor.encode(cbor.decode(unhexlify(f[0]))))
        except cbor.CborError as e:
            return "ERR " + e.reason
    if kind == "ccm_seal":
        key, nonce, aad, pt = (unhexlify(x) for x in f)
        out = bytearray(len(pt) + 8)
        n = AesCcm(key).encrypt(nonce, aad, pt, out)
        return _h(out[:n])
    if kind == "ccm_open":
        key, nonce, aad, ct = (unhexlify(x) for x in f)
        out = bytearray(len(ct))
        try:
            n = AesCcm(key).decrypt(nonce, aad, ct, out)
        except CcmError as e:
            return "ERR " + e.reason
        return _h(out[:n])
    if kind == "hmac":
        return _h(hkdf.hmac_sha256(unhexlify(f[0]), unhexlify(f[1])))
    if kind == "hkdf":
        return _h(hkdf.hkdf(unhexlify(f[0]), unhexlify(f[1]), unhexlify(f[2]), int(f[3])))
    raise ValueError(kind)


def main():
    kind = sys.argv[1]
    with open(sys.argv[2]) as fh:
        for line in fh:
            # "-" stands for an empty field
            fields = [("" if x == "-" else x) for x in line.split()]
            print(_case(kind, fields))


main()
