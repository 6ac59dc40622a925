"""Host-side tools of the serene module: pump simulator, STSAFE emulator, bench, deploy.

CPython only. The firmware (firmware/, drivers/) is MicroPython; the two meet on the wire.
"""

import pathlib

#: The repository root (tools/serene/__init__.py -> ../..).
REPO = pathlib.Path(__file__).resolve().parents[2]
