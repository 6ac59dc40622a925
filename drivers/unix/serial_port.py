# Serial port for the unix port: a tty or pty device opened raw, wrapped as an asyncio stream.
#
# The stm32 board profile uses machine.UART(19200, bits=7, parity=0) instead; both give the pump
# driver the same kind of object: an asyncio stream with read(n), readexactly(n), write(buf) and
# drain(). The unix port's termios module has only setraw/tcgetattr/tcsetattr and a few speeds
# (no CS7/PARENB), so the line is put in raw mode and its framing is left to the device: on a
# pty, which is what the bench uses, framing has no meaning.
import asyncio
import termios

# tcgetattr()'s list: [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]; VMIN/VTIME index cc
# (Linux <asm-generic/termbits.h>). VMIN = VTIME = 0 makes read() return what is there: the
# unix port's stream read(n) loops until n bytes on a blocking fd, and a 0 return ends the loop.
_CC = 6
_VTIME = 5
_VMIN = 6


def open_serial(path):
    """Open `path` in raw mode; return (file, stream). Close the file to release the port."""
    f = open(path, "r+b")
    fd = f.fileno()
    termios.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[_CC][_VMIN] = 0
    attrs[_CC][_VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return f, asyncio.StreamReader(f)
