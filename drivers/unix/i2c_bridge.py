# I2C bus for the unix port with the machine.I2C API, bridged over a loopback TCP socket.
#
# The host side is serene.i2c_bridge (tools/), where emulated devices (the STSAFE-A110
# emulator) plug in. The module is the client: it opens no listening socket.
#
# Wire protocol (one request, one reply, in order; all lengths big-endian):
#   write:  'W' addr(1) len(2) data(len)   ->  status(1)
#   read:   'R' addr(1) len(2)             ->  status(1) [data(len) if status == 0]
#   status: 0x00 = the device ACKed its address, 0x01 = address NACK (absent or busy)
# An address NACK is raised as OSError(ENODEV), as machine.I2C does on the stm32 port. So is a
# bridge that cannot be reached (no emulator listening, or it went away): to the driver it is
# a bus where nothing answers, and the connection is tried again at the next transfer.
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
        self._addr = socket.getaddrinfo(host, port)[0]
        self._timeout_s = timeout_s
        self._sock = None
        self._hdr = bytearray(4)
        self._status = bytearray(1)

    def _connect(self):
        ai = self._addr
        s = socket.socket(ai[0], socket.SOCK_STREAM)
        s.settimeout(self._timeout_s)
        try:
            s.connect(ai[-1])
        except OSError:
            s.close()
            raise OSError(_ENODEV)
        # IPPROTO_TCP, TCP_NODELAY: a transfer is a few small writes; without it Nagle and
        # delayed ACK add ~20 ms to each (measured on loopback).
        s.setsockopt(6, 1, 1)
        self._sock = s

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _transfer(self, fn, addr, buf):
        if self._sock is None:
            self._connect()
        try:
            fn(addr, buf)
        except OSError as e:
            if e.errno != _ENODEV or isinstance(e, BridgeError):
                self.close()  # the connection broke: a new one at the next transfer
                raise OSError(_ENODEV)
            raise

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
        self._transfer(self._write, addr, buf)
        return len(buf)

    def readfrom_into(self, addr, buf, stop=True):
        self._transfer(self._read, addr, buf)

    def _write(self, addr, buf):
        self._send_header(_OP_WRITE, addr, len(buf))
        self._sock.write(buf)
        self._check_ack()

    def _read(self, addr, buf):
        self._send_header(_OP_READ, addr, len(buf))
        self._check_ack()
        self._recv_exact(buf)

    def readfrom(self, addr, nbytes, stop=True):
        buf = bytearray(nbytes)
        self.readfrom_into(addr, buf)
        return bytes(buf)
