# A LoRaWAN device that runs until killed: joins (through the fake network in lorawan_fakes),
# sends uplinks on a virtual clock as fast as the duty cycle allows, rejoins every REJOIN
# uplinks, with its state in a DirStore under argv[1] and the session kept across restarts
# (test key wrapper). Prints "N <devnonce>" when a join-request is about to go and
# "F <devnonce> <fcnt>" when an uplink is about to go: both only after the value was reserved
# on flash, so a value printed twice would be a value used twice.
import asyncio
import sys

from drivers.lorawan.device import Device
from drivers.lorawan.store import DirStore
import lorawan_fakes as F

REJOIN = 40


class Modem(F.FakeModem):
    async def send(self, frame, tx_at_ms=None):
        if frame[0] == 0:
            print("N", frame[17] | frame[18] << 8)
        else:
            print("F", dev.mac.devnonce, frame[6] | frame[7] << 8, dev.mac.fcnt_up - 1)
        t = await super().send(frame, tx_at_ms)
        self.sent.clear()  # a process that runs until killed keeps no history
        self.windows.clear()
        return t


def responder(modem, frame):
    if frame[0] == 0:
        ja, _ = F.join_accept(frame[17] | frame[18] << 8, 1)
        return 5000, ja, modem.cfg["freq_khz"], modem.cfg["sf"]
    return None


async def main():
    global dev
    clock = F.VirtualClock()
    store = DirStore(sys.argv[1])
    dev = Device(Modem(clock, responder), store, F.DEV_EUI, F.JOIN_EUI, F.app_key,
                 key_wrapper=F.TestWrapper(), clock=clock)
    if not await dev.start():
        await dev.join()
    n = 0
    while True:
        await dev.send(10, b"payload")
        n += 1
        if n % REJOIN == 0:
            dev.mac.forget_session()
            await dev.join()


asyncio.run(main())
