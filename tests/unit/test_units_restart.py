"""The .deb's long-running units restart after a crash, but not after bad input (exit 2): a config error cannot be
fixed by restarting, and a unit that restarts every second hides it in the journal (found booting the image)."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance.core.errors import EXIT_BAD_INPUT

UNITS = Path(__file__).resolve().parents[2] / "packaging" / "debian" / "units"


@pytest.mark.parametrize("unit", ["appliance-proxy.service", "appliance-carp.service"])
def test_restarts_on_a_crash_but_not_on_bad_input(unit: str) -> None:
    lines = [l.strip() for l in (UNITS / unit).read_text().splitlines()]
    assert "Restart=always" in lines
    assert f"RestartPreventExitStatus={EXIT_BAD_INPUT}" in lines
