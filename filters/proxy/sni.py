"""A bounded TLS ClientHello parser: the SNI host name from the first bytes a client sends in a tunnel."""
from __future__ import annotations

MAX_HELLO = 65536  # a ClientHello larger than this (over several records) is not waited for
NEED_MORE = object()  # parse() result: the ClientHello is not complete yet
NOT_TLS = object()  # parse() result: the bytes are not a TLS ClientHello (tls: sni cuts the tunnel)
TOO_LARGE = object()  # parse() result: the ClientHello says it is longer than MAX_HELLO (cut, never waited for)


def _handshake(data: bytes) -> bytes | object:
    """The handshake bytes carried by the leading TLS records, NEED_MORE, or NOT_TLS."""
    out = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            return NEED_MORE
        ctype, major, length = data[pos], data[pos + 1], (data[pos + 3] << 8) | data[pos + 4]
        if ctype != 0x16 or major != 3 or length == 0 or length > 16384 + 2048:
            return NOT_TLS
        if len(data) < pos + 5 + length:  # a partial record: its handshake header may already say no
            part = out + data[pos + 5:pos + 5 + length]
            if len(part) >= 4 and (part[0] != 1 or 4 + ((part[1] << 16) | (part[2] << 8) | part[3]) > MAX_HELLO):
                return NOT_TLS if part[0] != 1 else TOO_LARGE
            return NEED_MORE
        out += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(out) >= 4:
            if out[0] != 1:  # not a ClientHello
                return NOT_TLS
            need = 4 + ((out[1] << 16) | (out[2] << 8) | out[3])
            if need > MAX_HELLO:
                return TOO_LARGE
            if len(out) >= need:
                return bytes(out[4:need])


def parse(data: bytes) -> str | None | object:
    """The SNI (lower case, no trailing dot) of the ClientHello at the start of `data`; None when it has no
    server_name; NEED_MORE when more bytes are needed; NOT_TLS when this is not a TLS ClientHello; TOO_LARGE when
    its handshake length is over MAX_HELLO."""
    body = _handshake(data)
    if not isinstance(body, bytes):
        return body
    try:
        p = 2 + 32  # client_version, random
        p += 1 + body[p]  # session_id
        p += 2 + ((body[p] << 8) | body[p + 1])  # cipher_suites
        p += 1 + body[p]  # compression_methods
        if p == len(body):
            return None  # no extensions
        end = p + 2 + ((body[p] << 8) | body[p + 1])
        if end > len(body):
            return NOT_TLS
        p += 2
        while p + 4 <= end:
            etype, elen = (body[p] << 8) | body[p + 1], (body[p + 2] << 8) | body[p + 3]
            p += 4
            if p + elen > end:
                return NOT_TLS
            if etype == 0:  # server_name: list length, then (type, length, name) entries
                q, lend = p + 2, p + 2 + ((body[p] << 8) | body[p + 1])
                while q + 3 <= min(lend, p + elen):
                    ntype, nlen = body[q], (body[q + 1] << 8) | body[q + 2]
                    q += 3
                    if ntype == 0 and 0 < nlen <= 255 and q + nlen <= p + elen:
                        name = body[q:q + nlen]
                        try:
                            return name.decode("ascii").lower().rstrip(".") or None
                        except UnicodeDecodeError:
                            return NOT_TLS
                    q += nlen
                return None
            p += elen
        return None
    except IndexError:
        return NOT_TLS
