# LoRaWAN L2 1.0.4 class A end device, EU868 (RP002-1.0.4): the MAC, usable alone.
#
# Copyright (c) the serene-module authors. MIT licence.
#
#   drivers/lorawan/crypto.py   AES-CMAC (RFC 4493), FRMPayload encryption, MIC, key derivation,
#                               all on cryptolib's AES-ECB
#   drivers/lorawan/eu868.py    regional parameters: data rates, payload sizes, bands, channels
#   drivers/lorawan/duty.py     per sub-band duty cycle (off-time + sliding-hour ledger) and the
#                               join retransmission back-off
#   drivers/lorawan/store.py    the persisted state (small files replaced atomically)
#   drivers/lorawan/mac.py      the non-blocking core: frames, session, MAC commands, ADR
#   drivers/lorawan/device.py   the async wrapper that drives a micropython-lib LoRa modem
# The manual is drivers/lorawan/README.md.


class LorawanError(Exception):
    """The MAC refused or could not do something. `reason` is a short name ("mic", "replay",
    "too long", "not joined", "store corrupt", "devnonce exhausted", ...); `detail` the data."""

    def __init__(self, reason, detail=None):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class FrameRefused(LorawanError):
    """A received frame was refused (bad MIC, replayed or old FCntDown, wrong address, malformed):
    nothing of it was used. Counted in Mac.stats[reason]."""


class NoChannel(LorawanError):
    """No channel may transmit now (duty cycle, join back-off). `detail` = ms to wait."""
