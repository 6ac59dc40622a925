# Board profile for the STM32 module (Pyboard-class, STM32F4/L4, armv7emsp).
#
# - Pump: machine.UART at 19200 baud, 7 data bits, even parity, 1 stop bit
#   (specs/pump-protocol.md). On the stm32 port `bits` counts data bits and parity=0 is even.
# - Secure element: machine.I2C at 100 kHz (specs/stsafe-a110.md §1: the safe speed).
# - Storage: the internal flash, formatted littlefs2 at provisioning and mounted at /flash by
#   the port's boot; the outbox lives under cfg["data_dir"].
# - Watchdog: machine.WDT, fed by the supervisor task.
# This file cannot run in CI (no UART/I2C on the unix port); it is compiled by mpy-cross there.
import asyncio
import machine
import os
from micropython import const

_PUMP_BAUD = const(19200)  # specs/pump-protocol.md, physical layer
_SE_I2C_HZ = const(100_000)  # specs/stsafe-a110.md §1: 100 kHz is the documented-safe speed
_UART_RXBUF = const(512)  # > 2 maximum-length frames (80 + 6 bytes) plus line noise


def open_pump_stream(cfg):
    uart = machine.UART(cfg["pump_uart"], _PUMP_BAUD, bits=7, parity=0, stop=1,
                        timeout=0, rxbuf=_UART_RXBUF)
    return asyncio.StreamReader(uart)


def open_se_bus(cfg):
    return machine.I2C(cfg["se_i2c"], freq=_SE_I2C_HZ)


def prepare_storage(cfg):
    path = cfg["data_dir"]
    try:
        os.stat(path)
    except OSError:
        os.mkdir(path)
    return path


def watchdog(cfg):
    if cfg["watchdog_ms"] <= 0:
        return None
    return machine.WDT(timeout=cfg["watchdog_ms"])


def modem_netif(cfg):
    """The LTE-M modem on its UART, brought up with AT commands then PPP (network.PPP)."""
    import network

    from drivers.radio.ltem import ModemPpp

    uart = machine.UART(cfg["modem_uart"], 115200, timeout=0, rxbuf=_UART_RXBUF)
    return ModemPpp(uart, cfg["modem_apn"], network.PPP)


# LoRa modem (radio "lora"): micropython-lib's async modems (mip install lora-async plus
# lora-stm32wl5 or lora-sx126x). lora_modem_chip "stm32wl5": the STM32WL55's sub-GHz radio
# (AsyncWLE5, SPI internal to the SoC); "sx1262": an SX1262MB2xAS shield on the Arduino header
# (SPI1, NSS D7/PA8, BUSY D3/PB3, DIO1 D5/PB4, RESET A0/PA0, DIO2 drives the RF switch, no
# TCXO on the xAS). Written against the drivers' documented constructors; not run here.
def lora_modem(cfg):
    if cfg["lora_modem_chip"] == "stm32wl5":
        from lora import AsyncWLE5

        return AsyncWLE5()
    from lora import AsyncSX1262

    spi = machine.SPI(1, baudrate=8_000_000)
    return AsyncSX1262(spi, machine.Pin("PA8", machine.Pin.OUT), busy=machine.Pin("PB3"),
                       dio1=machine.Pin("PB4"), reset=machine.Pin("PA0"),
                       dio2_rf_sw=True)


def lora_modem_module():
    import lora  # noqa: F401 - micropython-lib's modem package (frozen on the board)


def lora_rx_margin_ms():
    return 20  # crystal-driven RTC; LoRaMac-node's system max rx error is 10 ms
