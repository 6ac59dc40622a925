"""The unix-port I2C bridge: machine.I2C semantics over the socket, NACK as OSError(ENODEV)."""

from serene.i2c_bridge import I2CBridgeServer


class Recorder:
    """A device that ACKs writes, then NACKs the first read (busy), then answers."""

    def __init__(self):
        self.written = []
        self.busy_reads = 1

    def i2c_write(self, data):
        self.written.append(data)
        return True

    def i2c_read(self, n):
        if self.busy_reads:
            self.busy_reads -= 1
            return None
        return bytes(range(n))


SCRIPT = """
import sys
from drivers.unix.i2c_bridge import SocketI2C
i2c = SocketI2C("127.0.0.1", int(sys.argv[1]))
print("wrote", i2c.writeto(0x20, b"\\x01\\x02\\x03"))
try:
    i2c.readfrom(0x20, 4)
    print("read-no-nack")
except OSError as e:
    print("nack", e.errno)
print("read", i2c.readfrom(0x20, 4))
buf = bytearray(3)
i2c.readfrom_into(0x20, buf)
print("into", bytes(buf))
try:
    i2c.writeto(0x33, b"x")
except OSError as e:
    print("absent", e.errno)
"""


def test_bridge_round_trip_and_nack(upy, tmp_path):
    dev = Recorder()
    script = tmp_path / "bridge.py"
    script.write_text(SCRIPT)
    with I2CBridgeServer({0x20: dev}) as srv:
        res = upy.run([str(script), str(srv.port)])
    lines = res.stdout.splitlines()
    assert lines == [
        "wrote 3",
        "nack 19",
        "read b'\\x00\\x01\\x02\\x03'",
        "into b'\\x00\\x01\\x02'",
        "absent 19",
    ]
    assert dev.written == [b"\x01\x02\x03"]
