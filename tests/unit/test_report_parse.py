"""The report's reader: every field of a Squid native line, the tag, escapes, bad lines, rotations, gz, filters."""
from __future__ import annotations

import gzip
import ipaddress
import os
from datetime import datetime
from pathlib import Path

import pytest

from appliance.core.errors import BadInput
from appliance.core.logfiles import rotations, with_rotations
from appliance.report.figures import Figures
from appliance.report.parse import BadLine, host_of, parse_line
from appliance.report.reader import Window, read_all, read_file
from appliance.report.times import parse_when
from filters.proxy.accesslog import DENIED_TAG, block_tag, refusal_tag, squid_line

T0 = 1_704_276_000.0  # 2024-01-03 10:00 UTC


def line(ts=T0, client="10.0.0.5", code="TCP_MISS", status=200, size=1000, method="GET", url="http://a.test/x",
         peer="192.0.2.1", mime="text/html", tag="", elapsed=12) -> str:
    return squid_line(ts, elapsed, client, code, status, size, method, url, peer, mime, tag=tag)


def test_every_field_of_a_record_the_proxy_writes():
    r = parse_line(line(ts=T0 + 0.25, elapsed=37, size=4321, url="http://www.a.test:8080/p?q=1"))
    assert (r.ts, r.elapsed_ms, r.client, r.code, r.status, r.size) == (T0 + 0.25, 37, "10.0.0.5", "TCP_MISS", 200, 4321)
    assert (r.method, r.url, r.user, r.hier, r.peer, r.mime) == ("GET", "http://www.a.test:8080/p?q=1", "-",
                                                                 "HIER_DIRECT", "192.0.2.1", "text/html")
    assert (r.tag_kind, r.tag_name, r.denied) == (None, None, False)


@pytest.mark.parametrize("tag,kind,name", [(block_tag("adult"), "block", "adult"), (refusal_tag("loopback"), "refused",
                         "loopback"), (DENIED_TAG, "denied", "client"), (block_tag(None), "block", "none")])
def test_the_trailing_tag(tag, kind, name):
    text = line(code="TCP_DENIED", status=403, peer="-", tag=tag)
    assert text.rstrip("\n").endswith(f" [{kind}:{name}]")
    r = parse_line(text)
    assert (r.tag_kind, r.tag_name, r.denied, r.hier, r.peer) == (kind, name, True, "HIER_NONE", "-")


def test_a_tag_cannot_break_out_of_its_brackets_or_field():
    text = line(code="TCP_DENIED", status=403, tag="block:bad] [x y\nz")
    assert text.count("\n") == 1 and text.count("[") == 1 and text.count("]") == 1
    assert parse_line(text).tag_name == "bad%5D%20%5Bx%20y%0Az"


def test_squid_extras_are_skipped_and_escapes_kept():
    """A log with Squid's log_mime_hdrs brackets still parses; escaped URLs stay escaped (one field)."""
    text = line(url="http://a.test/with space\u00e9").rstrip("\n") + " [Host:%20a.test] [-]\n"
    r = parse_line(text)
    assert r.url == "http://a.test/with%20space%C3%A9" and r.tag_kind is None and r.mime == "text/html"


@pytest.mark.parametrize("bad,why", [
    ("", "empty"), ("1704276000.000 12 10.0.0.5 TCP_MISS/200 1000 GET http://a/", "fields"),
    ("abc 12 10.0.0.5 TCP_MISS/200 1000 GET http://a/ - HIER_NONE/- -", "time"),
    ("1704276000.000 12 10.0.0.5 TCP_MISS 1000 GET http://a/ - HIER_NONE/- -", "CODE/VALUE"),
    ("1704276000.000 12 10.0.0.5 TCP_MISS/2x0 1000 GET http://a/ - HIER_NONE/- -", "number"),
    ("1704276000.000 12 10.0.0.5 TCP_MISS/200 -5k GET http://a/ - HIER_NONE/- -", "number"),
    ("99999999999999.000 12 10.0.0.5 TCP_MISS/200 1 GET http://a/ - HIER_NONE/- -", "range"),
])
def test_bad_lines_say_which_field(bad, why):
    with pytest.raises(BadLine, match=why):
        parse_line(bad)


@pytest.mark.parametrize("url,method,host", [
    ("http://WWW.A.test:8080/x", "GET", "www.a.test"), ("a.test:443", "CONNECT", "a.test"),
    ("https://user:pw@b.test/", "GET", "b.test"), ("http://[2001:db8::1]:80/", "GET", "[2001:db8::1]"),
    ("[2001:db8::1]:443", "CONNECT", "[2001:db8::1]"), ("-", "-", "-"), ("http://c.test?q", "GET", "c.test"),
])
def test_host_of(url, method, host):
    assert host_of(url, method) == host


def _touch(p: Path, text: str = "", mtime: float | None = None, gz: bool = False) -> Path:
    if gz:
        with gzip.open(p, "wt") as f:
            f.write(text)
    else:
        p.write_text(text)
    if mtime is not None:
        os.utime(p, (mtime, mtime))
    return p


def test_rotations_oldest_first(tmp_path):
    live = tmp_path / "access.log"
    for name in ("access.log", "access.log.1", "access.log.2.gz", "access.log.10.gz", "access.log.3.bz2",
                 "access.log-20240101.gz", "access.log-20231231", "access.log.old", "other.log.1", "access.logx.1"):
        _touch(tmp_path / name)
    names = [p.name for p in with_rotations(live)]
    assert names == ["access.log-20231231", "access.log-20240101.gz", "access.log.10.gz", "access.log.3.bz2",
                     "access.log.2.gz", "access.log.1", "access.log"]
    assert rotations(tmp_path / "missing.log") == []


def test_gz_and_plain_rotations_read_in_order(tmp_path):
    live = tmp_path / "access.log"
    _touch(tmp_path / "access.log.2.gz", line(ts=T0), gz=True)
    _touch(tmp_path / "access.log.1", line(ts=T0 + 3600))
    _touch(live, line(ts=T0 + 7200) + line(ts=T0 + 7201, code="TCP_DENIED", status=403, tag=block_tag("adult")))
    fig = read_all(with_rotations(live), Figures(), Window())
    assert [Path(s.file).name for s in fig.sources] == ["access.log.2.gz", "access.log.1", "access.log"]
    assert (fig.requests, fig.blocked, fig.first, fig.last) == (4, 1, T0, T0 + 7201)
    assert [s.lines for s in fig.sources] == [1, 1, 2]


def test_bad_lines_are_counted_with_file_and_line_and_strict_stops(tmp_path):
    p = _touch(tmp_path / "access.log", line() + "garbage here\n" + line() + "\n")
    fig = Figures()
    src = read_file(p, fig, Window())
    assert (fig.requests, fig.bad_lines, src.bad) == (2, 2, 2)
    assert fig.bad_samples[0].startswith(f"{p}:2: ") and fig.bad_samples[1].startswith(f"{p}:4: empty line")
    with pytest.raises(BadInput, match=rf"{p}:2: not a Squid access-log record"):
        read_file(p, Figures(), Window(), strict=True)


def test_a_cut_gz_keeps_what_was_read(tmp_path):
    p = tmp_path / "access.log.2.gz"
    _touch(p, "".join(line(ts=T0 + i) for i in range(2000)), gz=True)
    p.write_bytes(p.read_bytes()[:-40])
    fig = Figures()
    src = read_file(p, fig, Window())
    assert src.error and "EOFError" in src.error and 0 < fig.requests <= 2000
    with pytest.raises(BadInput, match="cannot read after line"):
        read_file(p, Figures(), Window(), strict=True)


def test_since_until_and_client_filters(tmp_path):
    p = _touch(tmp_path / "access.log", "".join(
        line(ts=T0 + i * 600, client=c) for i in range(6) for c in ("10.0.0.5", "10.0.1.9", "2001:db8::7")))
    w = Window(since=T0 + 600, until=T0 + 3000, net=ipaddress.ip_network("10.0.0.0/24"))
    fig = read_all([p], Figures(), w, skip_old=False)
    assert (fig.requests, fig.skipped, fig.first, fig.last) == (4, 14, T0 + 600, T0 + 2400)  # 600,1200,1800,2400
    fig6 = read_all([p], Figures(), Window(net=ipaddress.ip_network("2001:db8::/64")))
    assert fig6.requests == 6 and fig6.clients.top(5) == [("2001:db8::7", 6)]


def test_a_file_last_written_before_since_is_not_opened(tmp_path):
    old = _touch(tmp_path / "access.log.1", line(ts=T0), mtime=T0 + 10)
    p = _touch(tmp_path / "access.log", line(ts=T0 + 7200), mtime=T0 + 7300)
    fig = read_all([old, p], Figures(), Window(since=T0 + 3600))
    assert [s.file for s in fig.sources] == [str(p)] and fig.requests == 1


def test_parse_when():
    now = datetime(2024, 1, 3, 15, 30).timestamp()
    assert parse_when("today", "--since", now) == datetime(2024, 1, 3).timestamp()
    assert parse_when("yesterday", "--since", now) == datetime(2024, 1, 2).timestamp()
    assert parse_when("-24h", "--since", now) == now - 86400
    assert parse_when("-30m", "--since", now) == now - 1800 and parse_when("now", "--until", now) == now
    assert parse_when("2024-01-03T10:00", "--since") == datetime(2024, 1, 3, 10).timestamp()
    assert parse_when("2024-01-03 10:00+01:00", "--since") == T0 - 3600
    with pytest.raises(BadInput, match=r"--until 'tomorrowish': not a time"):
        parse_when("tomorrowish", "--until")
