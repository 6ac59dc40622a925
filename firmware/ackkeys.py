# The ack keys of previous epochs, kept across reboots wrapped by the secure element.
# MIT licence, (c) serene-module authors. Contract: issue 8 protocol note, section E.
#
# The server seals an ack with the key of the epoch it acknowledges. After a reboot the
# outbox may still hold objects of earlier epochs, whose keys existed only in RAM: their acks
# could never open again. So at each epoch start the ack key and ack common IV (16 + 13
# bytes, zero-padded to 32 for the key wrap) are wrapped by the STSAFE-A110 (Wrap Local
# Envelope 0x0E, RFC 3394 AES key wrap under the local envelope key in `slot`, which never
# leaves the chip) and the 40-byte envelope is written to <root>/<epoch>.env (tmp, flush,
# rename: atomic). At boot each envelope is unwrapped (Unwrap Local Envelope 0x0F) into an
# opener; once an epoch has nothing left in the outbox its file is deleted. The plain ack key
# never reaches flash; the envelope is useless without this chip and the host C-MAC key.
import os
from micropython import const

from firmware import log

_log = log.Logger("ackkeys")

_KEY_LEN = const(16)
_IV_LEN = const(13)
_PLAIN_LEN = const(32)  # key || IV || 3 zero bytes: RFC 3394 takes multiples of 8 bytes
_ENV_LEN = const(40)  # the plain data + one 64-bit block (RFC 3394 §2.2.1)
_SUFFIX = ".env"
_ENOENT = const(2)


class AckKeyError(Exception):
    """An envelope could not be written or read. `reason`, `epoch`, `cause`."""

    def __init__(self, reason, epoch, cause=None):
        super().__init__(reason, epoch, cause)
        self.reason = reason
        self.epoch = epoch
        self.cause = cause


class AckKeyStore:
    def __init__(self, se, slot, root):
        self.se = se
        self.slot = slot
        self.root = root.rstrip("/")

    def _path(self, number):
        return "%s/%d%s" % (self.root, number, _SUFFIX)

    def epochs(self):
        """Epoch numbers with an envelope on flash, ascending."""
        out = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return out
        for name in names:
            if name.endswith(_SUFFIX):
                try:
                    out.append(int(name[: -len(_SUFFIX)]))
                except ValueError:
                    pass  # not ours
        out.sort()
        return out

    async def save(self, number, key, iv):
        """Wrap (key, iv) of epoch `number` and write its envelope. Raises AckKeyError
        (the secure element refused, or the file could not be written)."""
        if len(key) != _KEY_LEN or len(iv) != _IV_LEN:
            raise AckKeyError("input", number)
        plain = bytearray(_PLAIN_LEN)
        plain[:_KEY_LEN] = key
        plain[_KEY_LEN : _KEY_LEN + _IV_LEN] = iv
        try:
            env = await self.se.wrap(self.slot, plain)
        except Exception as e:  # noqa: BLE001 - driver, bus or parameter error: named
            if isinstance(e, MemoryError):
                raise
            raise AckKeyError("wrap", number, e)
        finally:
            for i in range(_PLAIN_LEN):
                plain[i] = 0
        if len(env) != _ENV_LEN:
            raise AckKeyError("wrap", number, "envelope length %d" % len(env))
        try:
            os.mkdir(self.root)
        except OSError:
            pass  # exists
        path = self._path(number)
        try:
            with open(path + ".tmp", "wb") as f:
                f.write(env)
                f.flush()
            if hasattr(os, "chmod"):  # 0600 where the port has modes (the unix port has not)
                os.chmod(path + ".tmp", 0o600)
            os.rename(path + ".tmp", path)
        except OSError as e:
            raise AckKeyError("write", number, e)

    async def load(self, number):
        """(key, iv) of epoch `number` from its envelope. Raises AckKeyError."""
        try:
            with open(self._path(number), "rb") as f:
                env = f.read()
        except OSError as e:
            raise AckKeyError("read", number, e)
        if len(env) != _ENV_LEN:
            raise AckKeyError("read", number, "envelope length %d" % len(env))
        try:
            plain = await self.se.unwrap(self.slot, env)
        except Exception as e:  # noqa: BLE001 - the chip refused it (integrity) or the bus
            if isinstance(e, MemoryError):
                raise
            raise AckKeyError("unwrap", number, e)
        if len(plain) != _PLAIN_LEN:
            raise AckKeyError("unwrap", number, "length %d" % len(plain))
        return bytes(plain[:_KEY_LEN]), bytes(plain[_KEY_LEN : _KEY_LEN + _IV_LEN])

    def delete(self, number):
        try:
            os.remove(self._path(number))
        except OSError as e:
            if e.args and e.args[0] != _ENOENT:
                _log.error("envelope of epoch %d not deleted: %s", number, e)
