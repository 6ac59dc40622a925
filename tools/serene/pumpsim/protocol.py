"""FK-Base ASCII framing for the simulator's side of the line (specs/pump-protocol.md).

Independent of the firmware driver (CPython, written from the spec): a frame is
`STX ADDR PAYLOAD CK1 CK0 ETX`, CK = 0xFF - (sum(ADDR+PAYLOAD) & 0xFF) as two uppercase hex
characters; ACK 0x06, NAK 0x15 + one error byte, ENQ 0x05 answered by DC4 0x14.
"""

STX, ETX, ENQ, ACK, DC4, NAK = 0x02, 0x03, 0x05, 0x06, 0x14, 0x15
MAX_PAYLOAD = 80

#: NAK error bytes (spec "Physical and link layer").
ERR_CHAR = b"1"
ERR_CHECKSUM = b"2"
ERR_ADDRESS = b"4"
ERR_ACK_TIMEOUT = b"5"
ERR_NOT_READY = b"6"
ERR_LENGTH = b"7"
ERR_CONTROL = b"8"
NAK_CODES = b"1245678"

#: Silence inside a frame after which it is abandoned (a whole frame at 19200 baud takes 45 ms;
#: the rest is room for this thread's scheduling, as in the driver).
FRAME_GAP_S = 1.0


def checksum(body: bytes) -> int:
    return 0xFF - (sum(body) & 0xFF)


def encode(address: bytes, payload: bytes) -> bytes:
    """A frame, unchecked: the simulator also sends what the driver must never send."""
    body = address + payload
    return b"\x02" + body + b"%02X\x03" % checksum(body)


class FrameReceiver:
    """Receive state machine. feed(data, now) returns a list of items:
    ("frame", payload) a valid frame for our address; ("ack",); ("nak", err byte int);
    ("dc4",); ("enq",); ("bad", err bytes, why) a bad frame to NAK; ("noise", n bytes)."""

    def __init__(self, address=b"1"):
        self.address = address
        self.maxbody = len(address) + MAX_PAYLOAD + 2
        self.reset()
        self.last = 0.0

    def reset(self):
        self.state = "idle"
        self.body = bytearray()
        self.noise = 0

    def _flush_noise(self, out):
        if self.noise:
            out.append(("noise", self.noise))
            self.noise = 0

    def feed(self, data: bytes, now: float):
        out = []
        if self.state != "idle" and now - self.last > FRAME_GAP_S:
            if self.state == "body":
                self.noise += len(self.body) + 1
            self.state = "idle"
        self.last = now
        for b in data:
            if self.state == "nak":
                self.state = "idle"
                if b in NAK_CODES:
                    out.append(("nak", b))
                    continue
                self.noise += 1
            if b == STX:
                if self.state == "body":
                    self.noise += len(self.body) + 1
                self._flush_noise(out)
                self.state = "body"
                self.body = bytearray()
            elif self.state == "body":
                if b == ETX:
                    self.state = "idle"
                    out.append(self._end())
                elif b < 0x20 or b == 0x7F:
                    self.state = "skip"
                    out.append(("bad", ERR_CONTROL, "control byte 0x%02X in frame" % b))
                elif b > 0x7F:
                    self.state = "skip"
                    out.append(("bad", ERR_CHAR, "byte 0x%02X in frame" % b))
                elif len(self.body) == self.maxbody:
                    self.state = "skip"
                    out.append(("bad", ERR_LENGTH, "frame over %d chars" % MAX_PAYLOAD))
                else:
                    self.body.append(b)
            elif self.state == "skip":
                if b == ETX:
                    self.state = "idle"
            elif b == ACK:
                self._flush_noise(out)
                out.append(("ack",))
            elif b == NAK:
                self._flush_noise(out)
                self.state = "nak"
            elif b == DC4:
                self._flush_noise(out)
                out.append(("dc4",))
            elif b == ENQ:
                self._flush_noise(out)
                out.append(("enq",))
            else:
                self.noise += 1
        self._flush_noise(out)
        return out

    def _end(self):
        body = bytes(self.body)
        alen = len(self.address)
        if len(body) < alen + 2:
            return ("bad", ERR_CHECKSUM, "frame too short for a checksum")
        ck = body[-2:]
        if ck != b"%02X" % checksum(body[:-2]):
            return ("bad", ERR_CHECKSUM, "checksum %r" % ck.decode("latin-1"))
        if body[:alen] != self.address:
            return ("bad", ERR_ADDRESS, "address %r" % body[:alen].decode("latin-1"))
        return ("frame", body[alen:-2])


def parse_fields(payload: bytes):
    """';<id><value>' fields after the command: [(id char, value str)], or None if malformed."""
    out = []
    for part in payload.split(b";")[1:]:
        if len(part) < 1:
            return None
        out.append((chr(part[0]), part[1:].decode("latin-1")))
    return out
