"""--since/--until values: ISO dates and times (local time unless they say otherwise), today, yesterday, now, -24h."""
from __future__ import annotations

import re
import time
from datetime import datetime, timedelta

from appliance.core.errors import BadInput

_REL = re.compile(r"-(\d{1,6})([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
HELP = "an ISO date or time (2024-01-03, 2024-01-03T10:00, 2024-01-03 10:00+01:00), today, yesterday, now, or -24h/-7d/-30m"


def parse_when(value: str, option: str, now: float | None = None) -> float:
    """Epoch seconds for one --since/--until value; BadInput naming the option and the value otherwise."""
    now = time.time() if now is None else now
    v = value.strip().lower()
    midnight = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
    if v == "now":
        return now
    if v == "today":
        return midnight.timestamp()
    if v == "yesterday":
        return (midnight - timedelta(days=1)).timestamp()
    m = _REL.fullmatch(v)
    if m:
        return now - int(m.group(1)) * _UNIT[m.group(2)]
    try:
        return datetime.fromisoformat(value.strip()).timestamp()  # naive: local time
    except ValueError:
        raise BadInput(f"{option} {value!r}: not a time; use {HELP}") from None


def iso(ts: float | None) -> str | None:
    """Local time with its offset, to the second (JSON, the page)."""
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def hour_label(hour: int) -> str:
    """An epoch hour as the page and the table show it: `2024-01-03 10:00` local time."""
    return datetime.fromtimestamp(hour * 3600).strftime("%Y-%m-%d %H:%M")
