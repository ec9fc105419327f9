"""SquidGuard `weekly` times as sets of minutes of the week (Python ints as bitmaps), and back as our schedule text."""
from __future__ import annotations

import re

from appliance.core.schedule import DAYS
from appliance.migrate.sgmodel import TimeDef, TimeElem

DAY = 1440
WEEK = 7 * DAY
FULL = (1 << WEEK) - 1
_NAME = re.compile(r"^(mon|tue|wed|thu|fri|sat|sun)[a-z]*$")
_NAMES = {"mon": "mon", "monday": "mon", "mondays": "mon", "tue": "tue", "tuesday": "tue", "tuesdays": "tue",
          "wed": "wed", "wednesday": "wed", "wednesdays": "wed", "thu": "thu", "thursday": "thu", "thursdays": "thu",
          "fri": "fri", "friday": "fri", "fridays": "fri", "sat": "sat", "saturday": "sat", "saturdays": "sat",
          "sun": "sun", "sunday": "sun", "sundays": "sun"}
_LETTERS = {"m": 0, "t": 1, "w": 2, "h": 3, "f": 4, "a": 5, "s": 6}  # SquidGuard's one-letter days (h = thursday)
_SPANS = re.compile(r"^\s*(\d\d:\d\d\s*-\s*\d\d:\d\d\s*,?\s*)+$")
_SPAN = re.compile(r"(\d\d):(\d\d)\s*-\s*(\d\d):(\d\d)")


def _days(words: list[str]) -> frozenset[int]:
    parts = [p for w in words for p in w.lower().split(",") if p]
    if parts == ["*"]:
        return frozenset(range(7))
    if parts and all(p in _NAMES for p in parts):
        return frozenset(DAYS.index(_NAMES[p]) for p in parts)
    if len(parts) == 1 and re.fullmatch(r"[smtwhfa]+", parts[0]):
        return frozenset(_LETTERS[c] for c in parts[0])
    raise ValueError(f"weekday format error in {' '.join(words)!r} (use *, mon tue ..., or letters smtwhfa)")


def _minute(h: str, m: str) -> int:
    hour, minute = int(h), int(m)
    if hour > 24 or minute > 59 or (hour == 24 and minute):
        raise ValueError(f"time {h}:{m} is not within 00:00-24:00")
    return hour * 60 + minute


def parse_weekly(words: list[str], line: int) -> TimeElem:
    """`weekly DAYS HH:MM-HH:MM ...`. A span whose end is not after its start is kept: it never matches in
    SquidGuard (it compares from <= now < to, with no wrap past midnight), and spans() says so."""
    cut = next((i for i, w in enumerate(words) if w[:1].isdigit() or w[:1] == "-"), len(words))
    days = _days(words[:cut])
    text = " ".join(words[cut:])
    if not text or not _SPANS.match(text):
        raise ValueError(f"expected time ranges HH:MM-HH:MM after the days, got {text or 'nothing'!r}")
    spans = [(_minute(a, b), _minute(c, d)) for a, b, c, d in _SPAN.findall(text)]
    return TimeElem(line, days, spans)


def bits(td: TimeDef) -> int:
    """The minutes of the week in which the time's weekly entries are active (its date entries are not carried)."""
    out = 0
    for el in td.weekly:
        for start, end in el.spans:
            if start >= end:
                continue
            run = ((1 << (end - start)) - 1) << start
            for d in el.days:
                out |= run << (d * DAY)
    return out


def _runs(day_bits: int) -> tuple[tuple[int, int], ...]:
    runs, m = [], 0
    while day_bits:
        low = (day_bits & -day_bits).bit_length() - 1  # next set bit
        m += low
        day_bits >>= low
        length = (~day_bits & (day_bits + 1)).bit_length() - 1  # length of the run of ones
        runs.append((m, m + length))
        m += length
        day_bits >>= length
    return tuple(runs)


def _hhmm(m: int) -> str:
    return f"{m // 60:02d}:{m % 60:02d}"


def _day_text(days: list[int]) -> str:
    parts, i = [], 0
    while i < len(days):
        j = i
        while j + 1 < len(days) and days[j + 1] == days[j] + 1:
            j += 1
        parts.append(DAYS[days[i]] if i == j else f"{DAYS[days[i]]}-{DAYS[days[j]]}")
        i = j + 1
    return ",".join(parts)


def render(week: int) -> str | None:
    """Our schedule text for a set of minutes ("mon-fri 08:00-17:00; sat 09:00-12:00"); None for the whole week.
    The set must not be empty."""
    if week & FULL == FULL:
        return None
    groups: dict[tuple, list[int]] = {}
    for d in range(7):
        runs = _runs((week >> (d * DAY)) & ((1 << DAY) - 1))
        if runs:
            groups.setdefault(runs, []).append(d)
    clauses = []
    for runs, days in sorted(groups.items(), key=lambda kv: kv[1][0]):
        spans = "" if runs == ((0, DAY),) else " " + ",".join(f"{_hhmm(a)}-{_hhmm(b)}" for a, b in runs)
        clauses.append(_day_text(days) + spans)
    return "; ".join(clauses)


def minute_of(when) -> int:
    """The bit of a datetime in these sets (local time, as both SquidGuard and our schedules use)."""
    return when.weekday() * DAY + when.hour * 60 + when.minute
