# The module's identity, as provisioning wrote it (serene provision: devices/<id>/module.json).
#
# It names the device, holds the MCU's half of the host-key pairing with the secure element
# (the MAC and cipher keys of the STSAFE host secure channel), and the secure element's zone
# map: where the device certificate, the pinned server key and the epoch counter live.
# Private keys are not here: they never leave the secure element.
from binascii import unhexlify

FORMAT = "serene-module/1"


class IdentityError(ValueError):
    def __init__(self, field, reason):
        super().__init__("identity %s: %s" % (field, reason))
        self.field = field


class Identity:
    def __init__(self, data):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise IdentityError("format", "not a %s file" % FORMAT)
        self.device_id = _str(data, "device_id")
        self.i2c_address = _int(data, "i2c_address")
        self.host_mac_key = _key(data, "host_mac_key")
        self.host_cipher_key = _key(data, "host_cipher_key")
        zones = data.get("zones")
        if not isinstance(zones, dict):
            raise IdentityError("zones", "missing")
        self.cert_zone = _int(_dict(zones, "certificate"), "zone")
        sk = _dict(zones, "server_key")
        self.server_key_zone = _int(sk, "zone")
        self.server_key_offset = _int(sk, "offset")
        self.server_key_length = _int(sk, "length")
        self.epoch_counter_zone = _int(_dict(zones, "epoch_counter"), "zone")
        self.factory_key_slot = _int(zones, "factory_key_slot")
        # Local envelope key slot (wraps the persisted ack keys); absent from a module.json
        # written before it existed: slot 0, where provisioning puts it.
        self.envelope_key_slot = 0
        if "envelope_key_slot" in zones:
            self.envelope_key_slot = _int(zones, "envelope_key_slot")
        # LoRaWAN OTAA (radio "lora"): DevEUI, JoinEUI, and the AppKey as an envelope of the
        # secure element's local envelope key (never in clear here); None without it.
        self.lorawan = None
        lw = data.get("lorawan")
        if lw is not None:
            lw = _dict(data, "lorawan")
            env = _hex(lw, "appkey_envelope", 24)
            self.lorawan = (_hex(lw, "dev_eui", 8), _hex(lw, "join_eui", 8), env)


def load(path):
    import json

    try:
        with open(path) as f:
            return Identity(json.load(f))
    except OSError as e:
        raise IdentityError(path, "cannot read: %s" % e)
    except ValueError as e:
        if isinstance(e, IdentityError):
            raise
        raise IdentityError(path, "not JSON: %s" % e)


def _dict(d, k):
    v = d.get(k)
    if not isinstance(v, dict):
        raise IdentityError(k, "missing")
    return v


def _str(d, k):
    v = d.get(k)
    if not isinstance(v, str) or not v:
        raise IdentityError(k, "missing")
    return v


def _int(d, k):
    v = d.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise IdentityError(k, "not a non-negative integer")
    return v


def _hex(d, k, n):
    try:
        v = unhexlify(_str(d, k))
    except ValueError:
        raise IdentityError(k, "not hex")
    if len(v) != n:
        raise IdentityError(k, "not %d bytes" % n)
    return v


def _key(d, k):
    v = _str(d, k)
    try:
        key = unhexlify(v)
    except ValueError:
        raise IdentityError(k, "not hex")
    if len(key) != 16:
        raise IdentityError(k, "not 16 bytes")
    return key
