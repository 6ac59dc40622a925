# Test helper (MicroPython): a scripted I2C bus for the STSAFE driver, and an independent
# bit-by-bit CRC-16/X-25 (the spec's algorithm, not the driver's byte-wise formula) to build
# response frames.


def crc_x25(data):
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def rsp(status, data=b""):
    """A response frame: STATUS LEN DATA CRC (LEN counts DATA + CRC; CRC skips LEN)."""
    covered = bytes([status]) + data
    c = crc_x25(covered)
    n = len(data) + 2
    return bytes([status, n >> 8, n & 0xFF]) + data + bytes([c >> 8, c & 0xFF])


class FakeI2C:
    """machine.I2C look-alike. Each write pops the next scripted response; reads return it
    from byte 0 (padded with 0xFF), after `busy_reads` NACKs (OSError 19)."""

    def __init__(self, responses=(), busy_reads=0):
        self.responses = list(responses)
        self.written = []
        self.reads = []
        self.busy_reads = busy_reads
        self.current = None

    def writeto(self, addr, buf, stop=True):
        if addr != 0x20:
            raise OSError(19)
        self.written.append(bytes(buf))
        self.current = self.responses.pop(0) if self.responses else None
        return len(buf)

    def readfrom_into(self, addr, buf, stop=True):
        if self.busy_reads:
            self.busy_reads -= 1
            raise OSError(19)
        if self.current is None:
            raise OSError(19)
        self.reads.append(len(buf))
        n = min(len(buf), len(self.current))
        buf[:n] = self.current[:n]
        for i in range(n, len(buf)):
            buf[i] = 0xFF


def unhex(s):
    import binascii

    return binascii.unhexlify(s.replace(" ", ""))
