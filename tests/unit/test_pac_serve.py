"""/proxy.pac and /wpad.dat from the filter addon (mitmproxy's test harness, no sockets): each client its VIP order."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from filters import ruleset
from filters.proxy import pac
from filters.proxy.accesslog import AccessLog
from filters.proxy.addon import FilterAddon, State
from tests.support.proxy import make_tree

PORT = 3128
VIPS = ["192.168.1.50", "192.168.1.51"]


def _state(tmp_path: Path, extra: list[dict]) -> State:
    cfg_path = make_tree(tmp_path)
    data = yaml.safe_load(cfg_path.read_text())
    data["cluster"]["extra_vhids"] = extra
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg, engine, _ = ruleset.load(cfg_path, compile_in_child=False)
    st = State(engine=engine, cfg=cfg, base=cfg_path.parent, access=AccessLog(str(tmp_path / "access.log")), port=PORT)
    st.configure(cfg, engine, "0.0.0.0")
    return st


@pytest.fixture
def active_active(tmp_path: Path):
    st = _state(tmp_path, [{"vhid": 2, "vip": "192.168.1.51/24", "advskew": {"fw1": 100, "fw2": 0}}])
    yield st
    st.access.close()


def fetch(st: State, client: str, host: str = "192.168.1.50", path: str = "/proxy.pac") -> http.Response:
    req = tutils.treq(scheme=b"http", host=host, port=PORT, authority=f"{host}:{PORT}".encode(), path=path.encode(),
                      content=b"")
    f = tflow.tflow(req=req, resp=False)
    f.client_conn.peername = (client, 40000)
    addon = FilterAddon(st)

    async def go() -> None:
        with taddons.context(addon) as tctx:
            await tctx.cycle(addon, f)

    asyncio.run(go())
    return f.response


def test_each_client_gets_its_order_from_any_vip_and_both_paths(active_active) -> None:
    clients = [f"192.168.1.{i}" for i in range(10, 30)]
    seen = set()
    for c in clients:
        want = pac.render(pac.order(c, VIPS), PORT)
        for host in VIPS:
            for path in ("/proxy.pac", "/wpad.dat"):
                r = fetch(active_active, c, host, path)
                assert (r.status_code, r.headers["content-type"]) == (200, pac.CONTENT_TYPE)
                assert r.raw_content == want
        seen.add(pac.order(c, VIPS)[0])
    assert seen == set(VIPS)  # both VIPs are somebody's primary among 20 clients


def test_the_pinned_client_gets_the_pinned_pac(active_active) -> None:
    body = fetch(active_active, "192.168.1.10").raw_content
    assert b'return "PROXY 192.168.1.51:3128; PROXY 192.168.1.50:3128";' in body
    body = fetch(active_active, "::ffff:192.168.1.11").raw_content
    assert b'return "PROXY 192.168.1.50:3128; PROXY 192.168.1.51:3128";' in body


def test_a_reload_with_another_vip_list_changes_the_pacs(tmp_path: Path, active_active) -> None:
    three = _state(tmp_path / "three", [{"vhid": 2, "vip": "192.168.1.51/24"}, {"vhid": 3, "vip": "192.168.1.52/24"}])
    active_active.configure(three.cfg, three.engine, "0.0.0.0")
    body = fetch(active_active, "192.168.1.10").raw_content
    assert body.count(b"PROXY ") == 3 and b"192.168.1.52:3128" in body
    three.access.close()


def test_one_vip_cluster_unchanged(tmp_path: Path) -> None:
    st = _state(tmp_path, [])
    try:
        for c in ("192.168.1.10", "192.168.1.11", "127.0.0.1"):
            assert fetch(st, c).raw_content == pac.render("192.168.1.50", PORT, [])
            assert b'return "PROXY 192.168.1.50:3128";' in fetch(st, c).raw_content
    finally:
        st.access.close()
