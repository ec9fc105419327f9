"""The framing state machine both gates share (filters/proxy/framing.py) and the worker's socket budget (gate.Slots):
an Upgrade or CONNECT request turns the checks off only once its answer switched protocols (issue 11 review, F3)."""
from __future__ import annotations

import pytest

from filters.proxy.framing import HeadScanner
from filters.proxy.gate import HeadError, Limits, Slots

LIM = Limits(header_timeout=5, idle_timeout=10, max_header_size=1024, max_url_length=256)
UPGRADE = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n"
NUL = b"GET http://a.example/ HTTP/1.1\r\nX: a\x00b\r\n\r\n"


def test_an_upgrade_not_switched_keeps_the_checks_on():
    s = HeadScanner(LIM, 0.0)
    assert s.scan(UPGRADE + NUL, 1.0) == UPGRADE  # what follows is held until the answer
    assert s.state == "wait" and s.held == NUL and s.timeout(1.0) is None
    assert s.decide(False, 2.0) and s.state == "head"
    with pytest.raises(HeadError) as e:
        s.scan(s.take_held(), 2.0)
    assert e.value.reason == "bad-request" and s.buf.startswith(b"GET http://a.example/ ")  # logged with its URL


def test_a_101_or_a_2xx_to_connect_makes_the_rest_opaque():
    for head in (UPGRADE, b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"):
        s = HeadScanner(LIM, 0.0)
        assert s.scan(head + b"\x16\x03\x01", 1.0) == head
        assert s.decide(True, 1.5) and s.state == "opaque"
        assert s.scan(s.take_held(), 2.0) == b"\x16\x03\x01" and s.scan(NUL, 2.0) == NUL


def test_an_upgrade_with_a_body_waits_after_the_body():
    s = HeadScanner(LIM, 0.0)
    head = UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n")
    assert s.scan(head + b"abcGET", 1.0) == head + b"abc" and s.state == "wait" and s.held == b"GET"


def test_decide_outside_a_wait_changes_nothing():
    s = HeadScanner(LIM, 0.0)
    assert not s.decide(True, 1.0) and s.state == "head"


def test_extra_upstream_sockets_count_in_the_worker_budget():
    slots = Slots(per_client=10, per_worker=3)  # a budget of 6 sockets
    assert slots.take("a") is None and slots.take("a") is None  # 4 used
    assert slots.take_extra() and slots.take_extra()  # 6 used
    assert not slots.take_extra() and slots.take("b") == "worker-connections"
    slots.give_extra()
    slots.give_extra()
    assert slots.take("b") is None
