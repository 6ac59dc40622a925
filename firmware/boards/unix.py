# Board profile for the MicroPython unix port (CI and the bench): the pump is a pty from the
# pump simulator, the secure element sits behind the I2C bridge on loopback, flash is a
# directory, and there is no hardware watchdog.
import os


def open_pump_stream(cfg):
    from drivers.unix.serial_port import open_serial

    return open_serial(cfg["pump_device"])[1]


def open_se_bus(cfg):
    from drivers.unix.i2c_bridge import SocketI2C

    return SocketI2C("127.0.0.1", cfg["se_bridge_port"])


def prepare_storage(cfg):
    path = cfg["data_dir"]
    _makedirs(path)
    return path


def _makedirs(path):
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not sub:
            continue
        try:
            os.mkdir(sub)
        except OSError as e:
            if e.errno != 17:  # EEXIST
                raise


def watchdog(cfg):
    return None


def lora_modem(cfg):
    # The RF medium simulator (tools/serene/lora/medium.py) on loopback, over UDP.
    from drivers.unix.lora_udp import UdpModem

    return UdpModem("127.0.0.1", cfg["lora_medium_port"])


def lora_modem_module():
    import drivers.unix.lora_udp  # noqa: F401


def lora_rx_margin_ms():
    return 60  # a process's scheduling noise (drivers/lorawan/device.py)


def modem_netif(cfg):
    return None  # the host's own network reaches the broker
