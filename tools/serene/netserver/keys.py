"""Provisioning of LoRaWAN OTAA keys for the stand-in network server (and the module).

``generate(path, ...)`` writes {"devices": [{"devEui", "joinEui", "appKey", "applicationId",
"deviceName"}]} (hex strings, ChirpStack's field names) into a file created 0600 in a directory
made 0700; an existing file gets the device appended. ``load(path)`` reads and checks it.
"""

import json
import os
import pathlib
import secrets


class KeysError(Exception):
    pass


def _hex(v, n, what):
    try:
        b = bytes.fromhex(v)
    except (TypeError, ValueError):
        raise KeysError("%s is not hex" % what) from None
    if len(b) != n:
        raise KeysError("%s must be %d bytes" % (what, n))
    return v.lower()


def load(path):
    data = json.loads(pathlib.Path(path).read_text())
    devs = data.get("devices")
    if not isinstance(devs, list):
        raise KeysError("no devices list")
    for d in devs:
        _hex(d.get("devEui"), 8, "devEui")
        _hex(d.get("joinEui"), 8, "joinEui")
        _hex(d.get("appKey"), 16, "appKey")
    return devs


def generate(path, dev_eui=None, join_eui="70b3d57ed0000000", app_key=None,
             application_id="serene", device_name=None):
    path = pathlib.Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    dev = {"devEui": _hex(dev_eui or secrets.token_hex(8), 8, "devEui"),
           "joinEui": _hex(join_eui, 8, "joinEui"),
           "appKey": _hex(app_key or secrets.token_hex(16), 16, "appKey"),
           "applicationId": application_id}
    dev["deviceName"] = device_name or "module-" + dev["devEui"]
    devs = load(path) if path.exists() else []
    devs = [d for d in devs if d["devEui"] != dev["devEui"]] + [dev]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"devices": devs}, f, indent=1)
    os.replace(tmp, path)
    os.chmod(path, 0o600)
    return dev
