# Board boot: runs before main.py on every reset.
# - The REPL stays on the USB port only (physical access); no UART carries it, and no radio
#   ever does: the module opens no listening socket and runs nothing it receives.
# - The garbage collector runs early and often so the heap never fragments into a state where
#   the preallocated buffers of the drivers cannot be made.
import gc
import sys

gc.threshold(4096)

if sys.platform == "pyboard":
    import pyb

    pyb.repl_uart(None)  # no REPL on any UART: the pump's UART carries pump frames only
