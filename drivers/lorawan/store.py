# The MAC's persisted state: a few small records, each replaced atomically.
#
# Copyright (c) the serene-module authors. MIT licence.
#
# DirStore(path) keeps each record in its own file under a directory (littlefs on the board,
# a host directory on the unix port): save() writes NAME.tmp, then renames it over NAME
# (rename is atomic on littlefs and POSIX), so a power cut leaves either the old record or
# the new one, never a mix. Each record carries a CRC-32; a record that does not check is an
# error (StoreCorrupt), never silently replaced by a default: for the DevNonce or the FCntUp
# reservation a default would mean reusing values.
# Any object with the same load/save methods can be injected instead (a test fake, an SE zone).
import os
import struct
from binascii import crc32

from drivers.lorawan import LorawanError


class StoreCorrupt(LorawanError):
    def __init__(self, name, detail=None):
        super().__init__("store corrupt", (name, detail))


class DirStore:
    def __init__(self, path):
        self.path = path.rstrip("/")
        try:
            os.mkdir(self.path)
        except OSError:
            pass  # exists (checked by the first load/save)
        self.writes = 0

    def _file(self, name):
        return self.path + "/" + name

    def load(self, name):
        """The record's bytes, or None if it was never saved."""
        try:
            with open(self._file(name), "rb") as f:
                data = f.read()
        except OSError:
            return None
        if len(data) < 4:
            raise StoreCorrupt(name, len(data))
        body = data[:-4]
        (crc,) = struct.unpack("<I", data[-4:])
        if crc32(body) & 0xFFFFFFFF != crc:
            raise StoreCorrupt(name, "crc")
        return body

    def save(self, name, body):
        tmp = self._file(name) + ".tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.write(struct.pack("<I", crc32(body) & 0xFFFFFFFF))
        os.rename(tmp, self._file(name))
        self.writes += 1

    def remove(self, name):
        try:
            os.remove(self._file(name))
        except OSError:
            pass


class RamStore:
    """In-RAM store with the same API (tests, and a board with nothing to persist)."""

    def __init__(self):
        self.records = {}
        self.writes = 0

    def load(self, name):
        return self.records.get(name)

    def save(self, name, body):
        self.records[name] = bytes(body)
        self.writes += 1

    def remove(self, name):
        self.records.pop(name, None)
