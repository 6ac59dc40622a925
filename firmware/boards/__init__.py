# Board profiles: each maps the names the application uses to real objects.
#   open_pump_stream(cfg) -> asyncio stream to the pump
#   open_se_bus(cfg)      -> an object with the machine.I2C API (writeto/readfrom_into)
#   prepare_storage(cfg)  -> the directory the outbox and state live in
#   watchdog(cfg)         -> an object with feed(), or None
# Only these modules touch `machine` or the unix shims; the application never does.


def load(name):
    if name == "unix":
        from firmware.boards import unix as board
    elif name == "stm32":
        from firmware.boards import stm32 as board
    else:
        raise ValueError("unknown board profile: %s" % name)
    return board
