"""CARP wire format: header layout, checksums and the HMAC derived step by step from ucarp's carp_hmac_prepare/generate."""
from __future__ import annotations

import hashlib
import struct

import pytest

from appliance.ha import protocol as cp


def ucarp_hmac(password: bytes, vhid: int, vip: bytes, counter: bytes) -> bytes:
    """ucarp's carp.c, transcribed: sc_key[20] = pass + NUL padding; sc_pad[64] = 0, key copied in,
    ^0x36; inner = SHA1(pad, version, type, vhid, vaddr, counter); pad ^= 0x36^0x5c; outer = SHA1(pad, inner)."""
    key = password + b"\0" * (20 - len(password))
    pad = bytearray(64)
    pad[:20] = key
    ipad = bytes(b ^ 0x36 for b in pad)
    inner = hashlib.sha1(ipad + bytes([2]) + bytes([1]) + bytes([vhid]) + vip + counter).digest()
    opad = bytes(b ^ 0x36 ^ 0x5C for b in ipad)
    return hashlib.sha1(opad + inner).digest()


@pytest.mark.parametrize("pw,vhid,vip,ctr", [
    (b"s3cret-pass", 1, "10.231.0.100", 0x0102030405060708),
    (b"x", 255, "192.168.1.50", 0),
    (b"nineteen-bytes-pass", 17, "172.16.0.1", 0xFFFFFFFFFFFFFFFF),
])
def test_hmac_matches_ucarp_algorithm(pw, vhid, vip, ctr):
    counter = struct.pack("!Q", ctr)
    vb = bytes(int(x) for x in vip.split("."))
    assert cp.carp_hmac(pw, vhid, vip, counter) == ucarp_hmac(pw, vhid, vb, counter)


def test_hmac_known_vector():
    # derived once with ucarp_hmac() above (pass "change-me", vhid 1, VIP 192.168.1.50, counter 1)
    got = cp.carp_hmac(b"change-me", 1, "192.168.1.50", struct.pack("!Q", 1))
    assert got == ucarp_hmac(b"change-me", 1, bytes([192, 168, 1, 50]), struct.pack("!Q", 1))
    assert got.hex() == KNOWN


KNOWN = "0c175fbeb7daa7d606c7f9eaac62202a88a6cf25"   # frozen: a change here breaks the wire format


def test_hmac_depends_on_every_input():
    base = cp.carp_hmac(b"pw", 1, "10.0.0.1", b"\0" * 8)
    assert cp.carp_hmac(b"pX", 1, "10.0.0.1", b"\0" * 8) != base
    assert cp.carp_hmac(b"pw", 2, "10.0.0.1", b"\0" * 8) != base
    assert cp.carp_hmac(b"pw", 1, "10.0.0.2", b"\0" * 8) != base
    assert cp.carp_hmac(b"pw", 1, "10.0.0.1", b"\0" * 7 + b"\1") != base


def test_pass_limits():
    cp.check_pass(b"a" * 19)
    for bad in (b"", b"a" * 20, b"a\0b"):
        with pytest.raises(ValueError):
            cp.check_pass(bad)


def test_header_layout_and_checksum():
    raw = cp.build_carp(b"pw", 7, "10.0.0.9", 1, 100, 0x1122334455667788)
    assert len(raw) == 36
    assert raw[0] == 0x21            # version 2, type 1 (advertisement)
    assert raw[1] == 7 and raw[2] == 100 and raw[3] == 7 and raw[4] == 0 and raw[5] == 1
    assert raw[8:16] == bytes.fromhex("1122334455667788")
    assert raw[16:] == cp.carp_hmac(b"pw", 7, "10.0.0.9", raw[8:16])
    assert cp.inet_checksum(raw) == 0
    a = cp.parse_carp(raw)
    assert (a.vhid, a.advbase, a.advskew, a.counter, a.authlen) == (7, 1, 100, 0x1122334455667788, 7)
    assert a.interval == pytest.approx(1 + 100 / 256)


def test_ip_header_like_ucarp():
    pkt = cp.build_packet(b"pw", 1, "10.0.0.9", "10.0.0.1", 1, 0, 5, ident=0x1234)
    assert len(pkt) == 56
    assert pkt[0] == 0x45 and pkt[1] == 0x10            # IHL 5, TOS lowdelay
    assert struct.unpack("!H", pkt[2:4])[0] == 56
    assert struct.unpack("!H", pkt[6:8])[0] == 0x4000   # DF
    assert pkt[8] == 255 and pkt[9] == 112
    assert pkt[16:20] == bytes([224, 0, 0, 18])
    assert cp.inet_checksum(pkt[:20]) == 0
    # ucarp's receive check sums IP header and CARP header together; both are 0-sum, so this holds too
    assert cp.inet_checksum(pkt) == 0
    rx = cp.parse_ip(pkt)
    assert (rx.src, rx.dst, rx.ttl) == ("10.0.0.1", "224.0.0.18", 255)
    assert cp.verify(rx, b"pw", 1, "10.0.0.9").counter == 5


def _rx(pkt: bytes, **over) -> cp.Received:
    rx = cp.parse_ip(pkt)
    return cp.Received(src=over.get("src", rx.src), dst=over.get("dst", rx.dst), ttl=over.get("ttl", rx.ttl),
                       advert=rx.advert)


@pytest.mark.parametrize("change,reason", [
    (dict(password=b"wrong"), "badauth"),
    (dict(vip="10.0.0.10"), "badauth"),
    (dict(vhid=2), "badvhid"),
    (dict(ttl=64), "badttl"),
    (dict(dst="224.0.0.19"), "baddst"),
])
def test_verify_rejects(change, reason):
    pkt = cp.build_packet(b"pw", 1, "10.0.0.9", "10.0.0.1", 1, 0, 5)
    rx = _rx(pkt, **{k: v for k, v in change.items() if k in ("ttl", "dst")})
    with pytest.raises(cp.BadPacket) as e:
        cp.verify(rx, change.get("password", b"pw"), change.get("vhid", 1), change.get("vip", "10.0.0.9"))
    assert e.value.reason == reason


def test_corrupted_packets():
    pkt = bytearray(cp.build_packet(b"pw", 1, "10.0.0.9", "10.0.0.1", 1, 0, 5))
    pkt[30] ^= 0xFF                                      # inside the counter: CARP checksum breaks
    with pytest.raises(cp.BadPacket) as e:
        cp.parse_ip(bytes(pkt))
    assert e.value.reason == "badsum"
    with pytest.raises(cp.BadPacket) as e:
        cp.parse_ip(bytes(pkt[:30]))
    assert e.value.reason == "short"
    pkt2 = bytearray(cp.build_packet(b"pw", 1, "10.0.0.9", "10.0.0.1", 1, 0, 5))
    pkt2[9] = 17
    with pytest.raises(cp.BadPacket) as e:
        cp.parse_ip(bytes(pkt2))
    assert e.value.reason == "notcarp"
    # a bit flip in the HMAC keeps a valid checksum only if fixed up: then the digest check catches it
    raw = bytearray(cp.build_carp(b"pw", 1, "10.0.0.9", 1, 0, 5))
    raw[20] ^= 1
    raw[6:8] = b"\0\0"
    raw[6:8] = struct.pack("!H", cp.inet_checksum(bytes(raw)))
    forged = cp.build_ip("10.0.0.1", cp.CARP_MCAST, bytes(raw), 1)
    with pytest.raises(cp.BadPacket) as e:
        cp.verify(cp.parse_ip(forged), b"pw", 1, "10.0.0.9")
    assert e.value.reason == "badauth"


def test_leave_advert():
    a = cp.parse_carp(cp.build_carp(b"pw", 1, "10.0.0.9", 255, 255, 1))
    assert a.is_leave
    assert not cp.parse_carp(cp.build_carp(b"pw", 1, "10.0.0.9", 1, 255, 1)).is_leave


def test_ucarp_tie_break_byte_order():
    # ucarp compares s_addr (network bytes) as a little-endian integer: the last octet is most significant
    assert cp.ucarp_src_less("10.0.0.2", "10.0.0.3")
    assert cp.ucarp_src_less("10.0.0.200", "9.0.0.201")    # numerically larger, yet "less" for ucarp
    assert not cp.ucarp_src_less("10.0.0.3", "10.0.0.2")


def test_hmac_several_vips_sorted_like_freebsd():
    ctr = struct.pack("!Q", 9)
    both = ucarp_hmac(b"pw", 3, bytes([10, 0, 0, 9]) + bytes([10, 0, 0, 200]), ctr)
    assert cp.carp_hmac(b"pw", 3, ["10.0.0.200", "10.0.0.9"], ctr) == both     # ascending, not given order
    assert cp.carp_hmac(b"pw", 3, ["10.0.0.9"], ctr) == cp.carp_hmac(b"pw", 3, "10.0.0.9", ctr)
