"""STSAFE-A110 on the bench: emulator, host-side client, provisioning.

- `protocol`: the wire format of specs/stsafe-a110.md (CRC, frames, C-MAC/R-MAC, encryption).
- `profile`: the emulated chip's personalisation and the module's zone map (one place).
- `emulator.StsafeEmulator`: the chip, as an I2C device for serene.i2c_bridge.
- `host.StsafeHost`: a small CPython host for the chip (provisioning station, tests).
- `provision`: `serene provision` and `provision(home, device_ids)`.
- `emu_cli`: `serene stsafe-emu`.
"""
