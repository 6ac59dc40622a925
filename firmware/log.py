# Levelled log lines with a module prefix, formatted lazily.
#
#   _log = log.Logger("app")
#   _log.warn("pump link: %s", name)   ->   "W app: pump link: checksum"
#
# Lines go to stdout (the board's USB REPL console, or the bench reading the unix port's
# stdout). The format is fixed so that host tools can parse it: "<L> <prefix>: <message>".
# Formatting happens only when the level is enabled; nothing is allocated for a disabled one.
from micropython import const

DEBUG = const(10)
INFO = const(20)
WARN = const(30)
ERROR = const(40)

_LETTERS = {DEBUG: "D", INFO: "I", WARN: "W", ERROR: "E"}
_level = INFO


def set_level(level):
    global _level
    _level = level


class Logger:
    def __init__(self, prefix):
        self.prefix = prefix

    def _emit(self, level, fmt, args):
        if level >= _level:
            print(_LETTERS[level], self.prefix + ":", (fmt % args) if args else fmt)

    def debug(self, fmt, *args):
        self._emit(DEBUG, fmt, args)

    def info(self, fmt, *args):
        self._emit(INFO, fmt, args)

    def warn(self, fmt, *args):
        self._emit(WARN, fmt, args)

    def error(self, fmt, *args):
        self._emit(ERROR, fmt, args)
