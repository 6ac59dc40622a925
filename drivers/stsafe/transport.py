# STSAFE-A110 driver: transport layer. I2C write/read with address-NACK polling, bounded.
# MIT licence, (c) serene-module authors. Spec: specs/stsafe-a110.md §1.
#
# The chip NACKs its address while it is busy or waking up (spec §1), so a NACK is "not yet",
# not an error, until the command's deadline. The only object touching the bus is the injected
# `i2c` (machine.I2C API: writeto / readfrom_into; a NACK raises OSError(ENODEV)).
#
# Core: try_write / try_read do one bus transfer, never sleep, and return True (ACK) or
# False (NACK). The async wrappers poll them with asyncio.sleep_ms until the deadline, so
# the chip's processing time never blocks the event loop.
import asyncio
import time
from micropython import const

from .errors import BusError, NackTimeout

_ENODEV = const(19)  # address NACK on machine.I2C (stm32 port) and on the unix bridge
_EIO = const(5)  # NACK during data bytes on some ports
_ENXIO = const(6)  # Linux i2c-dev address NACK ([ENG] maps it to NACK)
_EREMOTEIO = const(121)  # Linux i2c-dev NACK ([ENG] maps it to NACK)
_NACK_ERRNOS = (_ENODEV, _EIO, _ENXIO, _EREMOTEIO)


class Transport:
    def __init__(self, i2c, addr, poll_ms):
        self.i2c = i2c
        self.addr = addr
        self.poll_ms = poll_ms
        self.nacks = 0  # address NACKs seen since creation (diagnostics, benches)

    def _nack(self, e, cmd):
        if e.args and e.args[0] in _NACK_ERRNOS:
            self.nacks += 1
            return False
        raise BusError(cmd, detail=e.args[0] if e.args else None)

    def try_write(self, mv, cmd):
        """One write of the whole command frame. True = ACKed, False = NACK (busy)."""
        try:
            n = self.i2c.writeto(self.addr, mv)
        except OSError as e:
            return self._nack(e, cmd)
        # machine.I2C returns the number of ACKed bytes: fewer than sent = chip went busy.
        if n is not None and n < len(mv):
            self.nacks += 1
            return False
        return True

    def try_read(self, mv, cmd):
        """One read into mv (restarts at byte 0 of the response). True = ACK, False = NACK."""
        try:
            self.i2c.readfrom_into(self.addr, mv)
        except OSError as e:
            return self._nack(e, cmd)
        return True

    async def write(self, mv, cmd, deadline):
        """Write mv, polling while the chip NACKs, until `deadline` (ticks_ms)."""
        while not self.try_write(mv, cmd):
            await self._wait(cmd, deadline)

    async def read(self, mv, cmd, deadline):
        """Read len(mv) bytes, polling while the chip NACKs, until `deadline` (ticks_ms)."""
        while not self.try_read(mv, cmd):
            await self._wait(cmd, deadline)

    def _wait(self, cmd, deadline):
        """The awaitable for the next poll, or NackTimeout once the deadline has passed."""
        left = time.ticks_diff(deadline, time.ticks_ms())
        if left <= 0:
            raise NackTimeout(cmd, detail=self.nacks)
        return asyncio.sleep_ms(min(self.poll_ms, left))
