"""proxy.pac for active/active: the per-client VIP order (stable, spread, fallbacks) and the rendered text."""
from __future__ import annotations

import ipaddress
import itertools
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from filters.proxy import pac
from tests.support.env import ROOT

V2 = ["192.168.1.50", "192.168.1.51"]
V3 = V2 + ["192.168.1.52"]
# The PAC every release before active/active served for a one-VIP cluster (byte for byte).
SINGLE = (b'function FindProxyForURL(url, host) {\n'
          b'    if (isPlainHostName(host) || host == "localhost" || shExpMatch(host, "127.*")) return "DIRECT";\n'
          b'    return "PROXY 192.168.1.50:3128";\n'
          b'}\n')
RETURN = re.compile(rb'return "((?:PROXY [0-9.]+:\d+(?:; )?)+)";')


def addresses(start: str, count: int) -> list[str]:
    first = ipaddress.ip_address(start)
    return [str(first + i) for i in range(count)]


def proxies(body: bytes) -> list[str]:
    """The PROXY entries of the PAC's last return, in order."""
    [m] = RETURN.findall(body)
    return [p.split(" ", 1)[1] for p in m.decode().split("; ")]


def test_single_vip_cluster_serves_the_pac_it_always_did() -> None:
    assert pac.render("192.168.1.50", 3128, []) == SINGLE
    pacs = pac.Pacs(["192.168.1.50"], 3128, [])
    assert {pacs.for_client(c) for c in ("192.168.1.10", "10.9.8.7", "::1", "not-an-address")} == {SINGLE}


def test_assignment_is_pinned() -> None:
    """The documented function (BLAKE2b-64 keyed carpguard-pac-v1 over "<client> <vip>"): these values must never
    change, or every node and restart would have to agree on a new one (clients would move)."""
    assert pac.score("192.168.1.10", "192.168.1.50") == 7462761080917485415
    assert pac.order("192.168.1.10", V2) == ("192.168.1.51", "192.168.1.50")
    assert pac.order("192.168.1.11", V2) == ("192.168.1.50", "192.168.1.51")
    assert pac.order("10.0.0.1", V2) == ("192.168.1.50", "192.168.1.51")


def test_assignment_is_the_same_in_another_process_with_another_hash_seed() -> None:
    """Python's str hash is salted per process; a node restart (a new process) must give the same orders."""
    clients = addresses("192.168.1.1", 64)
    here = [",".join(pac.order(c, V3)) for c in clients]
    code = ("import sys; from filters.proxy import pac; "
            f"print('\\n'.join(','.join(pac.order(c, {V3!r})) for c in {clients!r}))")
    for seed in ("1", "4242"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": seed})
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == here


def test_the_vip_list_order_in_the_config_does_not_change_the_assignment() -> None:
    for c in addresses("192.168.1.1", 32):
        assert pac.order(c, V3) == pac.order(c, list(reversed(V3))) == pac.order(c, [V3[1], V3[0], V3[2]])


def test_even_spread_of_primaries_over_a_lan() -> None:
    lan = addresses("192.168.1.1", 254)
    got = Counter(pac.order(c, V2)[0] for c in lan)
    assert set(got) == set(V2)
    assert all(0.4 * 254 <= n <= 0.6 * 254 for n in got.values()), got
    big = addresses("10.0.0.0", 4096)
    got3 = Counter(pac.order(c, V3)[0] for c in big)
    assert all(abs(n / 4096 - 1 / 3) < 0.03 for n in got3.values()), got3


def test_a_failed_vips_clients_spread_over_the_rest() -> None:
    """Rendezvous order: the clients whose primary dies fall back to each remaining VIP about equally (a rotation
    would send them all to one)."""
    big = addresses("10.0.0.0", 4096)
    orphans = [c for c in big if pac.order(c, V3)[0] == V3[0]]
    second = Counter(pac.order(c, V3)[1] for c in orphans)
    assert set(second) == set(V3[1:])
    assert all(abs(n / len(orphans) - 0.5) < 0.06 for n in second.values()), second
    # the fallbacks are the order a cluster without that VIP would give: removing a VIP moves only its clients
    for c in big[:500]:
        o = pac.order(c, V3)
        assert o[1:] == pac.order(c, V3[1:]) if o[0] == V3[0] else o[0] == pac.order(c, V3[1:])[0]


def test_every_vip_once_primary_first_then_fallbacks() -> None:
    pacs = pac.Pacs(V3, 3128, [])
    for c in addresses("192.168.1.1", 50):
        got = proxies(pacs.for_client(c))
        assert got == [f"{v}:3128" for v in pac.order(c, V3)]
        assert sorted(got) == sorted(f"{v}:3128" for v in V3)
    # two VIPs: the fallback is always the other one
    for c in addresses("192.168.1.1", 50):
        first, second = proxies(pac.Pacs(V2, 8080, []).for_client(c))
        assert {first, second} == {"192.168.1.50:8080", "192.168.1.51:8080"}


def test_no_direct_fallback_after_the_proxies() -> None:
    """A filter that is down must not be bypassed: the last return has PROXY entries only."""
    body = pac.Pacs(V2, 3128, []).for_client("192.168.1.10")
    assert body.rstrip().endswith(b'return "PROXY 192.168.1.51:3128; PROXY 192.168.1.50:3128";\n}')
    assert body.count(b"DIRECT") == 1  # the local-names rule only


def test_direct_nets_are_kept_before_the_proxies() -> None:
    body = pac.Pacs(V2, 3128, ["10.0.0.0/8", "192.168.7.7"]).for_client("192.168.1.10")
    assert b'if (isInNet(host, "10.0.0.0", "255.0.0.0")) return "DIRECT";' in body
    assert b'if (isInNet(host, "192.168.7.7", "255.255.255.255")) return "DIRECT";' in body
    assert body.index(b"isInNet") < body.index(b"PROXY")


def test_ipv4_mapped_and_odd_clients() -> None:
    assert pac.order("::ffff:192.168.1.10", V2) == pac.order("192.168.1.10", V2)
    assert pac.client_key("::FFFF:192.168.1.10") == "192.168.1.10"
    assert pac.client_key("fe80::1%em0") == "fe80::1"
    # not an address (no peer): the configured order, cluster.vip first
    assert pac.order("", V3) == tuple(V3) and pac.order("bogus", V3) == tuple(V3)


def test_one_rendering_per_order_and_small_bytes() -> None:
    pacs = pac.Pacs(V3, 3128, [])
    bodies = {c: pacs.for_client(c) for c in addresses("10.1.0.0", 500)}
    assert len(pacs._cache) == len(set(bodies.values())) == len(list(itertools.permutations(V3)))
    again = pacs.for_client("10.1.0.7")
    assert again is bodies["10.1.0.7"]  # served from the cache, not rendered again
    # the bytes added per further VIP are its "; PROXY a.b.c.d:port" and nothing else
    assert {len(b) for b in bodies.values()} == {len(SINGLE) + 2 * len("; PROXY 192.168.1.52:3128")}


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pac, "CACHE_MAX", 2)
    pacs = pac.Pacs(V3, 3128, [])
    bodies = {pacs.for_client(c) for c in addresses("10.1.0.0", 300)}
    assert len(bodies) == 6 and len(pacs._cache) == 2
