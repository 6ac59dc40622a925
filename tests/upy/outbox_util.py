# Helpers for the outbox tests (MicroPython): a RAM block device for littlefs that can lose
# power at a chosen write, temporary directories, and the objects the tests store.
import os
import struct
import vfs

_EIO = 5


class RAMBlockDev:
    """Block device for vfs.VfsLfs2 held in a bytearray (extended interface: offsets).

    Every program (writeblocks) and erase (ioctl 6) is one write operation, numbered from 1.
    With cut_at=K, operation K is the power cut: only its first `partial` bytes land (a prog
    cut short), it and every later write return -EIO and change nothing. Reads keep working
    (the image is what a remount after the cut sees)."""

    def __init__(self, block_size=512, blocks=64, image=None, cut_at=None, partial=0):
        self.bs = block_size
        self.n = blocks
        if image is None:
            self.data = bytearray(b"\xff" * (block_size * blocks))
        else:
            self.data = bytearray(image)
        self.writes = 0
        self.cut_at = cut_at
        self.partial = partial
        self.dead = False

    def _cut(self):
        self.writes += 1
        if self.dead:
            return True
        if self.cut_at is not None and self.writes >= self.cut_at:
            self.dead = True
            return True
        return False

    def readblocks(self, block, buf, off=0):
        a = block * self.bs + off
        buf[:] = memoryview(self.data)[a : a + len(buf)]

    def writeblocks(self, block, buf, off=0):
        a = block * self.bs + off
        if self._cut():
            if self.writes == self.cut_at:
                k = min(self.partial, len(buf))
                self.data[a : a + k] = memoryview(buf)[:k]
            return -_EIO
        self.data[a : a + len(buf)] = buf
        return 0

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self.n
        if op == 5:  # block size
            return self.bs
        if op == 6:  # erase
            if self._cut():
                return -_EIO
            a = arg * self.bs
            self.data[a : a + self.bs] = b"\xff" * self.bs
            return 0
        return 0


def mount(bd, path, mkfs=False):
    if mkfs:
        vfs.VfsLfs2.mkfs(bd)
    vfs.mount(vfs.VfsLfs2(bd), path)


def umount(path):
    try:
        vfs.umount(path)
    except OSError:
        pass


def tmpdir(tag):
    d = "/tmp/serene-test-%s-%s" % (tag, "".join("%02x" % b for b in os.urandom(4)))
    os.mkdir(d)
    return d


def rmtree(path):
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        return
    for e in entries:
        p = path + "/" + e[0]
        if e[1] == 0x4000:
            rmtree(p)
        else:
            os.remove(p)
    os.rmdir(path)


def obj(kind, epoch, seq, n=None):
    """A deterministic stand-in for a sealed object: n bytes (20..60, 600 for an epoch
    record) derived from its identity, so any copy can be checked byte for byte."""
    if n is None:
        n = 600 if kind == 0 else 20 + (epoch * 7 + seq * 13) % 41
    head = struct.pack("<BII", kind, epoch, seq)
    out = bytearray(n)
    for i in range(n):
        out[i] = head[i % 9] ^ ((i * 31 + seq) & 0xFF)
    return bytes(out)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path, data, mode="wb"):
    with open(path, mode) as f:
        f.write(data)
