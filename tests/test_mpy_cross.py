"""Every firmware file compiles with mpy-cross for the board (STM32F4/L4: armv7emsp)."""

import pytest

from serene import upy


@pytest.mark.parametrize("rel", [str(p) for p in upy.firmware_sources()])
def test_compiles_for_armv7emsp(rel, tmp_path):
    upy.compile_file(upy.REPO / rel, tmp_path / "out.mpy", march="armv7emsp")
    assert (tmp_path / "out.mpy").stat().st_size > 0
