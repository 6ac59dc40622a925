# STSAFE-A110 driver: exceptions. MIT licence, (c) serene-module authors.
# Spec: /work/shared/specs/stsafe-a110.md §3 (status codes; host-library codes 0x20-0x32).
#
# Layers, as STSELib's return codes: the chip reports a status (SEStatusError, one class per
# code 0x01-0x1F); the host detects a failure of the link or of the secure channel
# (SEHostError: CRC, R-MAC, NACK time-out, length, decryption, parameter, device identity).
# Every instance carries `cmd` (the 5-bit command code that failed) and `code` (the status or
# host code), so a caller can log what failed without parsing text.


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


# Chip statuses (spec §3), one class each.
class CommunicationError(SEStatusError):
    code = 0x01


class InconsistentCommandData(SEStatusError):
    code = 0x02


class ValueOutOfRange(SEStatusError):
    code = 0x03


class UnsupportedCommandCode(SEStatusError):
    code = 0x04


class UnexpectedError(SEStatusError):
    code = 0x05


class BufferLengthExceeded(SEStatusError):
    code = 0x06


class WrongSession(SEStatusError):
    code = 0x07


class TooManyMessageLost(SEStatusError):
    code = 0x08


class CmacCounterLimitReached(SEStatusError):
    code = 0x09


class KeyNotFound(SEStatusError):
    code = 0x0A


class KeyBlocked(SEStatusError):
    code = 0x0B


class WrongKeyType(SEStatusError):
    code = 0x0C


class CounterOutOfRange(SEStatusError):
    code = 0x0D


class DepthOutOfRange(SEStatusError):
    code = 0x0E


class InvalidLifeCycleState(SEStatusError):
    code = 0x0F


class EntryNotFound(SEStatusError):
    code = 0x10


class UnsatisfiedAccessCondition(SEStatusError):
    code = 0x11


class IncorrectZoneType(SEStatusError):
    code = 0x12


class CounterLimitExceeded(SEStatusError):
    code = 0x13


class BoundaryExceeded(SEStatusError):
    code = 0x14


class InvalidPrivateKey(SEStatusError):
    code = 0x15


class InvalidCMAC(SEStatusError):
    code = 0x16


class ChallengeMissing(SEStatusError):
    code = 0x17


class CommandDecryptionError(SEStatusError):
    code = 0x18


class InvalidPublicKey(SEStatusError):
    code = 0x19


class PasswordBlocked(SEStatusError):
    code = 0x1A


class WrongKeyUsage(SEStatusError):
    code = 0x1B


class WrongModeOfOperation(SEStatusError):
    code = 0x1C


class WrongMACLength(SEStatusError):
    code = 0x1D


class UnauthorizedCommand(SEStatusError):
    code = 0x1E


class OldMessage(SEStatusError):
    code = 0x1F


# Index = status code; 0x00 (OK) never raises.
_BY_STATUS = (
    None,
    CommunicationError,
    InconsistentCommandData,
    ValueOutOfRange,
    UnsupportedCommandCode,
    UnexpectedError,
    BufferLengthExceeded,
    WrongSession,
    TooManyMessageLost,
    CmacCounterLimitReached,
    KeyNotFound,
    KeyBlocked,
    WrongKeyType,
    CounterOutOfRange,
    DepthOutOfRange,
    InvalidLifeCycleState,
    EntryNotFound,
    UnsatisfiedAccessCondition,
    IncorrectZoneType,
    CounterLimitExceeded,
    BoundaryExceeded,
    InvalidPrivateKey,
    InvalidCMAC,
    ChallengeMissing,
    CommandDecryptionError,
    InvalidPublicKey,
    PasswordBlocked,
    WrongKeyUsage,
    WrongModeOfOperation,
    WrongMACLength,
    UnauthorizedCommand,
    OldMessage,
)


def status_error(cmd, status):
    """The exception for chip status `status` (low 5 bits) answered to command `cmd`."""
    status &= 0x1F
    if status == 0:
        raise ValueError("status 0 is not an error")
    return _BY_STATUS[status](cmd)
