"""CARP v2 wire format (IPv4): advertisement build/parse and the HMAC-SHA1 that ucarp and FreeBSD carp use."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

IPPROTO_CARP = 112
CARP_MCAST = "224.0.0.18"
CARP_TTL = 255
CARP_VERSION = 2
CARP_ADVERTISEMENT = 1
CARP_AUTHLEN = 7            # counter (2 words) + SHA-1 (5 words), in 32-bit words
CARP_KEY_LEN = 20           # the key buffer: the pass plus its NUL must fit, so at most 19 bytes
CARP_PASS_MAX = CARP_KEY_LEN - 1
CARP_HEADER_LEN = 36
IP_HEADER_LEN = 20
IPTOS_LOWDELAY = 0x10
IP_DF = 0x4000
LEAVE_ADVBASE = 255         # "bow out": advbase 255 / advskew 255 tells backups to take over now
LEAVE_ADVSKEW = 255

_CARP = struct.Struct("!BBBBBBH8s20s")   # ver|type, vhid, advskew, authlen, demote, advbase, cksum, counter, md
_IP = struct.Struct("!BBHHHBBH4s4s")


class BadPacket(ValueError):
    """A packet that is not a valid CARP advertisement; `reason` is a short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def inet_checksum(data: bytes) -> int:
    """RFC 1071 ones'-complement sum, as ucarp's cksum(); 0 over data that carries a correct checksum."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def check_pass(password: bytes) -> bytes:
    if not password:
        raise ValueError("the CARP pass is empty")
    if len(password) > CARP_PASS_MAX:
        raise ValueError(f"the CARP pass is {len(password)} bytes; ucarp and FreeBSD carp allow at most {CARP_PASS_MAX}")
    if b"\0" in password:
        raise ValueError("the CARP pass contains a NUL byte")
    return password


def carp_hmac(password: bytes, vhid: int, vip: str | Sequence[str], counter: bytes) -> bytes:
    """HMAC-SHA1 as ucarp/ip_carp.c compute it.

    key = the pass, NUL-padded to 20 bytes (an HMAC key shorter than the 64-byte block is zero-padded
    anyway, so this is plain HMAC with the pass as key); message = version, type, vhid (one byte each),
    the VIP (4 bytes, network order; FreeBSD hashes every address of the vhid in ascending order, which
    for one VIP is the same), then the 8-byte counter exactly as it sits in the packet."""
    if len(counter) != 8:
        raise ValueError("counter must be 8 bytes")
    vips = [vip] if isinstance(vip, str) else list(vip)
    addrs = b"".join(a.packed for a in sorted({ipaddress.IPv4Address(v) for v in vips}))
    msg = bytes([CARP_VERSION, CARP_ADVERTISEMENT, vhid & 0xFF]) + addrs + counter
    return hmac.new(check_pass(password), msg, hashlib.sha1).digest()


@dataclass(frozen=True)
class Advert:
    vhid: int
    advbase: int
    advskew: int
    counter: int = 0
    md: bytes = b"\0" * 20
    demote: int = 0
    version: int = CARP_VERSION
    type: int = CARP_ADVERTISEMENT
    authlen: int = CARP_AUTHLEN

    @property
    def interval(self) -> float:
        """advbase + advskew/256 seconds: the figure CARP compares (lower wins)."""
        return self.advbase + self.advskew / 256.0

    @property
    def is_leave(self) -> bool:
        return self.advbase == LEAVE_ADVBASE and self.advskew == LEAVE_ADVSKEW


def build_carp(password: bytes, vhid: int, vip: str, advbase: int, advskew: int, counter: int) -> bytes:
    """The 36-byte CARP header with counter, HMAC and checksum filled in."""
    if not 1 <= vhid <= 255:
        raise ValueError("vhid must be 1-255")
    if not 0 <= advbase <= 255 or not 0 <= advskew <= 255:
        raise ValueError("advbase and advskew must be 0-255")
    ctr = struct.pack("!Q", counter & 0xFFFFFFFFFFFFFFFF)
    md = carp_hmac(password, vhid, vip, ctr)
    raw = _CARP.pack((CARP_VERSION << 4) | CARP_ADVERTISEMENT, vhid, advskew, CARP_AUTHLEN, 0, advbase, 0, ctr, md)
    return raw[:6] + struct.pack("!H", inet_checksum(raw)) + raw[8:]


def build_ip(src: str, dst: str, payload: bytes, ident: int) -> bytes:
    """IPv4 header like ucarp's: TOS lowdelay, DF, TTL 255, protocol 112, header checksum."""
    hdr = _IP.pack(0x45, IPTOS_LOWDELAY, IP_HEADER_LEN + len(payload), ident & 0xFFFF, IP_DF, CARP_TTL,
                   IPPROTO_CARP, 0, ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
    return hdr + payload


def build_packet(password: bytes, vhid: int, vip: str, src: str, advbase: int, advskew: int, counter: int,
                 ident: int = 0, dst: str = CARP_MCAST) -> bytes:
    return build_ip(src, dst, build_carp(password, vhid, vip, advbase, advskew, counter), ident)


def parse_carp(data: bytes) -> Advert:
    """Decode a CARP header (no authentication); BadPacket on short/garbled input."""
    if len(data) < CARP_HEADER_LEN:
        raise BadPacket("short", f"{len(data)} bytes")
    vt, vhid, advskew, authlen, demote, advbase, _ck, ctr, md = _CARP.unpack_from(data)
    if inet_checksum(data[:CARP_HEADER_LEN]) != 0:
        raise BadPacket("badsum")
    return Advert(vhid=vhid, advbase=advbase, advskew=advskew, counter=struct.unpack("!Q", ctr)[0], md=md,
                  demote=demote, version=vt >> 4, type=vt & 0x0F, authlen=authlen)


@dataclass(frozen=True)
class Received:
    src: str
    dst: str
    ttl: int
    advert: Advert


def parse_ip(data: bytes) -> Received:
    """Decode an IPv4 packet carrying CARP (what a raw IP socket or AF_PACKET after the Ethernet header gives)."""
    if len(data) < IP_HEADER_LEN:
        raise BadPacket("short", "no IP header")
    vihl, _tos, _tlen, _id, _off, ttl, proto, _sum, src, dst = _IP.unpack_from(data)
    if vihl >> 4 != 4:
        raise BadPacket("notipv4")
    ihl = (vihl & 0x0F) * 4
    if proto != IPPROTO_CARP:
        raise BadPacket("notcarp", f"protocol {proto}")
    return Received(src=str(ipaddress.IPv4Address(src)), dst=str(ipaddress.IPv4Address(dst)), ttl=ttl,
                    advert=parse_carp(data[ihl:]))


def check_header(rx: Received, vhid: int, mcast: str = CARP_MCAST) -> Advert:
    """ucarp's checks before the digest, in its order (TTL, version, type, vhid, destination)."""
    a = rx.advert
    if rx.ttl != CARP_TTL:
        raise BadPacket("badttl", str(rx.ttl))
    if a.version != CARP_VERSION:
        raise BadPacket("badver", str(a.version))
    if a.type != CARP_ADVERTISEMENT:
        raise BadPacket("badtype", str(a.type))
    if a.vhid != vhid:
        raise BadPacket("badvhid", str(a.vhid))
    if rx.dst != mcast:
        raise BadPacket("baddst", rx.dst)
    return a


def check_auth(a: Advert, password: bytes | Sequence[bytes], vhid: int, vip: str) -> Advert:
    """The digest. It covers version, type, vhid, the VIP and the counter only: advbase, advskew, demote,
    the IP source and TTL are outside it, so whoever replays a captured advert may change them freely.
    `password` may be several passes (a rotation window: the pass and the next one); any one of them will do."""
    auth_index(a, [password] if isinstance(password, bytes) else password, vhid, vip)
    return a


def auth_index(a: Advert, passwords: Sequence[bytes], vhid: int, vip: str) -> int:
    """Which of `passwords` signed the advert (its index); BadPacket("badauth") when none did."""
    ctr = struct.pack("!Q", a.counter)
    for i, pw in enumerate(passwords):
        if hmac.compare_digest(carp_hmac(pw, vhid, vip, ctr), a.md):
            return i
    raise BadPacket("badauth", "check vhid, pass and VIP")


def verify(rx: Received, password: bytes, vhid: int, vip: str, mcast: str = CARP_MCAST) -> Advert:
    """ucarp's checks in its order (TTL, version, vhid, destination, digest); BadPacket names the failure.
    This is all ucarp and carp(4) check; the speaker adds source, timing and counter checks (appliance.ha.guard)."""
    return check_auth(check_header(rx, vhid, mcast), password, vhid, vip)


def ucarp_src_less(a: str, b: str) -> bool:
    """ucarp's tie-break `ip_src.s_addr < srcip.s_addr`: compares the network-order bytes as a host
    (little-endian on x86/arm) integer. Reproduced so a tie resolves the same way on both engines."""
    return (int.from_bytes(ipaddress.IPv4Address(a).packed, "little")
            < int.from_bytes(ipaddress.IPv4Address(b).packed, "little"))
