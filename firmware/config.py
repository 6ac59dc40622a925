# The module's configuration: one dict of defaults, overridden by a JSON file, validated.
#
# Configuration is data, never executed code (STYLE.md 7.6). Every key has a default that is
# right for the board; a file names only what differs. An unknown key, or a value of the wrong
# type, is refused with ConfigError naming the key: a typo must not silently fall back to a
# default on a medical device.

DEFAULTS = {
    # board profile: "stm32" or "unix" (firmware/boards/)
    "board": "stm32",
    # pump link
    "pump_protocol": "fkbase",  # drivers/pump/<protocol>.py
    "pump_device": "",  # unix: serial device path (a pty from the simulator)
    "pump_uart": 2,  # stm32: UART id; 19200 7E1 per specs/pump-protocol.md
    "pump_address": "1",
    "poll_period_ms": 5000,  # how often the status is read (LE)
    "status_every_s": 60,  # a status record at least this often, changed or not
    # secure element
    "se_i2c": 1,  # stm32: I2C bus id
    "se_bridge_port": 0,  # unix: the I2C bridge's TCP port on 127.0.0.1
    # storage
    "data_dir": "/flash/data",
    # supervisor
    "health_period_s": 60,  # a health record at least this often
    "watchdog_ms": 8000,  # stm32 machine.WDT time-out; 0 = off
    "log_level": 20,  # firmware/log.py levels
    "run_for_s": 0,  # stop after this many seconds (bench, tests); 0 = run forever
    "drain_s": 0,  # after run_for_s: stop polling, deliver what is stored for up to this long
    # identity: the module.json written by provisioning ("" = pump-only mode: records are
    # printed, not sealed; for bench work on the pump link without a secure element)
    "identity": "",
    # store and forward
    "outbox_capacity": 262144,  # bytes of sealed objects kept on flash at most
    "outbox_segment": 4096,  # = the littlefs block size (firmware/outbox.py)
    "link_window": 64,  # objects in flight before an ack: the ack round trip bounds the rate
    "checkpoint_every_n": 32,  # a signed checkpoint every N sealed records...
    "checkpoint_every_s": 600,  # ... and at least this often
    "epoch_rotate_s": 86400,  # a new epoch (new keys) this often, besides every boot; 0 = never
    # radio: LTE-M over MQTT (drivers/radio/ltem.py)
    "mqtt_host": "127.0.0.1",
    "mqtt_port": 8883,
    "mqtt_user": "",
    "mqtt_password": "",
    "mqtt_tls_pin": "",  # path of the broker's certificate (DER) to pin; "" = plain TCP
    # Plain TCP to a broker that is not on this machine (127.x, localhost, ::1) is refused
    # unless said here explicitly: TLS with the pinned certificate is the default (issue 8).
    "mqtt_plain": False,
    "modem_uart": 3,  # stm32: the LTE-M modem's UART
    "modem_apn": "",  # stm32: the operator's APN
    # radio choice: "ltem" (above) or "lora" (LoRaWAN 1.0.4 class A EU868, drivers/radio/lora.py
    # over drivers/lorawan; the keys from the identity file's "lorawan" entry)
    "radio": "ltem",
    "lora_dr": 5,  # DR of the first join-request (and of the uplinks until ADR moves it)
    "lora_adr": True,
    "lora_medium_port": 0,  # unix: the RF medium simulator's UDP port on 127.0.0.1
    "lora_link_window": 32,  # objects in flight: an ack asked for every 16 (half)
    # an ack is asked for every half window, with every checkpoint, and at the end of a burst
    # once its oldest object has waited this long (downlinks are scarce)
    "lora_ack_delay_ms": 300000,
    "lora_coalesce_ms": 30000,  # a small record waits at most this long for others to share
    # its frame (never an alarm)
    "lora_rx_margin_ms": 0,  # receive window margin; 0 = the board's (unix 60, stm32 20)
    "lora_modem_chip": "stm32wl5",  # stm32: "stm32wl5" (STM32WL55) or "sx1262" (shield)
}


class ConfigError(ValueError):
    def __init__(self, key, reason):
        super().__init__("config %s: %s" % (key, reason))
        self.key = key


def load(path=None, overrides=None):
    """Defaults, then the JSON file at `path` (if any), then `overrides` (a dict)."""
    cfg = dict(DEFAULTS)
    if path:
        import json

        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise ConfigError(path, "cannot read: %s" % e)
        except ValueError as e:
            raise ConfigError(path, "not JSON: %s" % e)
        if not isinstance(data, dict):
            raise ConfigError(path, "not a JSON object")
        _merge(cfg, data)
    if overrides:
        _merge(cfg, overrides)
    check(cfg)
    return cfg


def is_loopback(host):
    """True for a host name or address of this machine only (127.0.0.0/8, localhost, ::1):
    plain TCP there never leaves the box."""
    h = host.lower()
    return h.startswith("127.") or h in ("localhost", "::1", "[::1]")


def check(cfg):
    """Rules between keys. A non-loopback broker without a pinned certificate is refused
    (ConfigError naming mqtt_tls_pin) unless mqtt_plain is true: the firmware never falls
    back to plain TCP over a network by default."""
    if cfg["radio"] not in ("ltem", "lora"):
        raise ConfigError("radio", "ltem or lora, not %r" % cfg["radio"])
    if not 0 <= cfg["lora_dr"] <= 5:
        raise ConfigError("lora_dr", "EU868 DR0-DR5")
    if cfg["radio"] == "ltem" and cfg["identity"] and not cfg["mqtt_tls_pin"] and not cfg["mqtt_plain"] \
            and not is_loopback(cfg["mqtt_host"]):
        raise ConfigError("mqtt_tls_pin", "required for broker %s (TLS with the pinned "
                          "certificate), or set mqtt_plain to true explicitly"
                          % cfg["mqtt_host"])


def _merge(cfg, data):
    for key, value in data.items():
        if key not in DEFAULTS:
            raise ConfigError(key, "unknown key")
        want = type(DEFAULTS[key])
        if type(value) is not want:
            raise ConfigError(key, "expected %s, got %r" % (want.__name__, value))
        cfg[key] = value
