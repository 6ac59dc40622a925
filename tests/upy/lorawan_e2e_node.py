# The module side of the end-to-end LoRa test: drivers/radio/lora.py over the LoRaWAN MAC
# over drivers/unix/lora_udp.py to the RF medium at argv[1]:argv[2]; OTAA keys from argv[3]
# (devEui), argv[4] (joinEui), argv[5] (AppKey, hex; a test provider: on the board the STSAFE
# unwraps it). Joins, then sends "up-<n>" every 2 s until a downlink arrives (printed as
# "DOWN <hex>") and then one more uplink; prints "JOINED <devaddr>", "UP <n>", "DONE".
import asyncio
import sys
from binascii import hexlify, unhexlify

from drivers.lorawan import LorawanError
from drivers.lorawan.device import Device
from drivers.lorawan.store import DirStore
from drivers.radio.lora import LoraRadio
from drivers.unix.lora_udp import UdpModem

KEY = unhexlify(sys.argv[5])


async def app_key():
    return KEY


async def main():
    modem = UdpModem(sys.argv[1], int(sys.argv[2]))
    dev = Device(modem, DirStore(sys.argv[6]), unhexlify(sys.argv[3]), unhexlify(sys.argv[4]),
                 app_key, rx_margin_ms=60)
    radio = LoraRadio(dev)
    while True:
        try:
            await dev.join(max_attempts=1)
            break
        except LorawanError as e:
            print("JOIN FAILED", e.reason, dev.stats, modem.stats, dev.last_refused)
    print("JOINED %08x" % dev.mac.dev_addr, "mtu", radio.mtu, "dr", dev.mac.dr)
    got = None
    for n in range(12):
        await radio.send(b"up-%d" % n)
        print("UP", n, "fcnt", dev.mac.fcnt_up - 1)
        got = await radio.recv(0)
        if got is not None:
            print("DOWN", hexlify(got).decode())
            await radio.send(b"after")
            break
        await asyncio.sleep_ms(2000)
    print("STATS", dev.stats, dev.mac.stats, modem.stats)
    print("DONE")


asyncio.run(main())
