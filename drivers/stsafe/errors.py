# STSAFE-A110 driver: exceptions. MIT licence, (c) serene-module authors.
# Spec: /work/shared/specs/stsafe-a110.md §3 (status codes; host-library codes 0x20-0x32).
#
# Layers, as STSELib's return codes: the chip reports a status (SEStatusError, one class per
# code 0x01-0x1F); the host detects a failure of the link or of the secure channel
# (SEHostError: CRC, R-MAC, NACK time-out, length, decryption, parameter, device identity).
# Every instance carries `cmd` (the 5-bit command code that failed) and `code` (the status or
# host code), so a caller can log what failed without parsing text.


__all__ = (
    "SEError",
    "SEStatusError",
    "SEHostError",
    "CryptoError",
    "RMACError",
    "CRCError",
    "ParameterError",
    "LengthError",
    "NackTimeout",
    "BusError",
    "WrongDevice",
    "status_error",
)


class SEError(Exception):
    """Base of every STSAFE error. args = (cmd, code, detail)."""

    code = None

    def __init__(self, cmd, code=None, detail=None):
        if code is None:
            code = self.code
        super().__init__(cmd, code, detail)
        self.cmd = cmd
        self.code = code
        self.detail = detail


class SEStatusError(SEError):
    """The chip answered with a non-zero status (spec §3). Not retried blindly."""


class SEHostError(SEError):
    """The host side detected the failure (codes from the host libraries, spec §3)."""


# Host-side failures. Codes as ST's host libraries number them (spec §3).
class CryptoError(SEHostError):
    code = 0x20  # CRYPTO_LIB_ISSUE: bad padding after decryption, host keys missing


class RMACError(SEHostError):
    code = 0x21  # INVALID_RMAC: response MAC wrong or missing


class CRCError(SEHostError):
    code = 0x22  # INVALID_CRC: response CRC still wrong after the re-reads


class ParameterError(SEHostError):
    code = 0x30  # INVALID_PARAMETER: refused before anything was sent


class LengthError(SEHostError):
    code = 0x31  # INVALID_RESP_LENGTH: LEN field or data layout not as expected


class NackTimeout(SEHostError):
    code = 0x32  # COMMUNICATION_NACK: chip NACKed until the command's time bound


class BusError(SEHostError):
    code = 0x32  # the bus failed with an error other than an address NACK (detail = errno)


class WrongDevice(SEHostError):
    code = 0x30  # not an STSAFE-A110 (detail = mask id) or a terminated chip


# Chip statuses (spec §3): one class per code, named after ST's status names. The classes
# are made on first use (status_error, or `errors.KeyNotFound` through the module
# __getattr__), so the 31 of them cost no RAM until a chip error or an `except` needs one.
STATUS_NAMES = (
    None,
    "CommunicationError",  # 0x01: command CRC wrong (corrupted on the bus)
    "InconsistentCommandData",
    "ValueOutOfRange",
    "UnsupportedCommandCode",
    "UnexpectedError",
    "BufferLengthExceeded",
    "WrongSession",
    "TooManyMessageLost",
    "CmacCounterLimitReached",
    "KeyNotFound",  # 0x0A
    "KeyBlocked",
    "WrongKeyType",
    "CounterOutOfRange",
    "DepthOutOfRange",
    "InvalidLifeCycleState",
    "EntryNotFound",  # 0x10
    "UnsatisfiedAccessCondition",
    "IncorrectZoneType",
    "CounterLimitExceeded",
    "BoundaryExceeded",
    "InvalidPrivateKey",
    "InvalidCMAC",  # 0x16
    "ChallengeMissing",
    "CommandDecryptionError",
    "InvalidPublicKey",
    "PasswordBlocked",
    "WrongKeyUsage",
    "WrongModeOfOperation",
    "WrongMACLength",
    "UnauthorizedCommand",
    "OldMessage",  # 0x1F
)
_classes = {}


def status_class(code):
    """The SEStatusError subclass for chip status `code` (1..0x1F), made once."""
    cls = _classes.get(code)
    if cls is None:
        cls = _classes[code] = type(STATUS_NAMES[code], (SEStatusError,), {"code": code})
    return cls


def status_error(cmd, status):
    """The exception for chip status `status` (low 5 bits) answered to command `cmd`."""
    return status_class(status & 0x1F)(cmd)


def __getattr__(name):
    try:
        code = STATUS_NAMES.index(name)
    except ValueError:
        raise AttributeError(name) from None
    return status_class(code)
