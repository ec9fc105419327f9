"""proxy.pac / wpad.dat: point browsers at VIP:port; local names and the LAN itself stay direct."""
from __future__ import annotations


def render(vip: str, port: int, direct_nets: list[str] | None = None) -> bytes:
    nets = "".join(
        f'    if (isInNet(host, "{n.split("/")[0]}", "{_mask(n)}")) return "DIRECT";\n' for n in (direct_nets or [])
    )
    return (
        "function FindProxyForURL(url, host) {\n"
        '    if (isPlainHostName(host) || host == "localhost" || shExpMatch(host, "127.*")) return "DIRECT";\n'
        f"{nets}"
        f'    return "PROXY {vip}:{port}";\n'
        "}\n"
    ).encode()


def _mask(net: str) -> str:
    bits = int(net.split("/")[1]) if "/" in net else 32
    m = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    return ".".join(str((m >> s) & 255) for s in (24, 16, 8, 0))


CONTENT_TYPE = "application/x-ns-proxy-autoconfig"
