# Bus shims for the MicroPython unix port: objects with the machine.* APIs the drivers expect,
# backed by a pty (serial) or a loopback socket to a host-side emulator (I2C).
