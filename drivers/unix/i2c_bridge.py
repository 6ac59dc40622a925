# I2C bus for the unix port with the machine.I2C API, bridged over a loopback TCP socket.
#
# The host side is serene.i2c_bridge (tools/), where emulated devices (the STSAFE-A110
# emulator) plug in. The module is the client: it opens no listening socket.
#
# Wire protocol (one request, one reply, in order; all lengths big-endian):
#   write:  'W' addr(1) len(2) data(len)   ->  status(1)
#   read:   'R' addr(1) len(2)             ->  status(1) [data(len) if status == 0]
#   status: 0x00 = the device ACKed its address, 0x01 = address NACK (absent or busy)
# An address NACK is raised as OSError(ENODEV), as machine.I2C does on the stm32 port.
import socket
import struct
from micropython import const

_OP_WRITE = const(0x57)  # 'W'
_OP_READ = const(0x52)  # 'R'
_ACK = const(0)
_ENODEV = const(19)
_MAX_LEN = const(0xFFFF)
# A bridged transfer is a loopback round trip plus the emulator's bookkeeping (< 1 ms
# measured); 2 s only catches a dead emulator, never a busy chip (that is a NACK).
_SOCKET_TIMEOUT_S = const(2)


class BridgeError(OSError):
    pass


class SocketI2C:
    """machine.I2C look-alike: writeto, readfrom, readfrom_into, over the bridge socket."""

    def __init__(self, host="127.0.0.1", port=0, timeout_s=_SOCKET_TIMEOUT_S):
        ai = socket.getaddrinfo(host, port)[0]
        self._sock = socket.socket(ai[0], socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        self._sock.connect(ai[-1])
        # IPPROTO_TCP, TCP_NODELAY: a transfer is a few small writes; without it Nagle and
        # delayed ACK add ~20 ms to each (measured on loopback).
        self._sock.setsockopt(6, 1, 1)
        self._hdr = bytearray(4)
        self._status = bytearray(1)

    def close(self):
        self._sock.close()

    def _send_header(self, op, addr, n):
        if n > _MAX_LEN:
            raise ValueError("i2c transfer too long")
        struct.pack_into(">BBH", self._hdr, 0, op, addr, n)
        self._sock.write(self._hdr)

    def _recv_exact(self, buf):
        mv = memoryview(buf)
        got = 0
        while got < len(buf):
            n = self._sock.readinto(mv[got:])
            if not n:
                raise BridgeError(_ENODEV)
            got += n

    def _check_ack(self):
        self._recv_exact(self._status)
        if self._status[0] != _ACK:
            raise OSError(_ENODEV)

    def writeto(self, addr, buf, stop=True):
        self._send_header(_OP_WRITE, addr, len(buf))
        self._sock.write(buf)
        self._check_ack()
        return len(buf)

    def readfrom_into(self, addr, buf, stop=True):
        self._send_header(_OP_READ, addr, len(buf))
        self._check_ack()
        self._recv_exact(buf)

    def readfrom(self, addr, nbytes, stop=True):
        buf = bytearray(nbytes)
        self.readfrom_into(addr, buf)
        return bytes(buf)
