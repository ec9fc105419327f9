"""`appliance lists update` as the admin runs it: the happy path decided by `appliance explain`, every refusal leaving
the live lists and the generation as they were, a backup refusing, the https fetch with a test CA, the due script."""
from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import http.server
import json
import os
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from appliance.core.model_lists import Lists
from appliance.core.paths import Paths
from appliance.core.state import write_role
from appliance.lists import fetch
from appliance.lists.errors import ListsError
from image import render
from sync.releases import Releases
from tests.support import due_script
from tests.support.env import APPLIANCE, config_tree
from tests.unit.test_lists import domains, shalla, tarball, ut1



class Node:
    """A node's state dir as installed: releases/1, current -> releases/1, node.yaml, a role."""

    def __init__(self, root: Path, role: str | None = "MASTER"):
        self.state = root / "state"
        (self.state / "releases").mkdir(parents=True)
        config_tree(self.state / "releases" / "1")
        os.symlink("releases/1", self.state / "current")
        (self.state / "node.yaml").write_text("node: fw1\n")
        if role:
            write_role(Paths(self.state), role, 1, "lo")

    @property
    def tree(self) -> Path:
        return self.state / "current"

    def edit(self, **lists) -> None:
        p = self.tree / "appliance.yaml"
        data = yaml.safe_load(p.read_text())
        data.setdefault("lists", {}).update(lists)
        p.write_text(yaml.safe_dump(data, sort_keys=False))

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        e = {**os.environ, "APPLIANCE_STATE_DIR": str(self.state), "APPLIANCE_NODE": "fw1", **(env or {})}
        return subprocess.run([APPLIANCE, "-c", str(self.tree / "appliance.yaml"), *args], env=e, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)

    def update(self, *args: str, env: dict | None = None) -> tuple[int, dict]:
        r = self.run("lists", "update", "--json", *args, env=env)
        try:
            return r.returncode, json.loads(r.stdout)
        except ValueError:
            raise AssertionError(f"no JSON (exit {r.returncode}): {r.stdout!r} {r.stderr!r}") from None

    def explain(self, url: str) -> dict:
        r = self.run("explain", url, "--client", "192.168.1.10", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def lists_digest(self) -> str:
        h = hashlib.sha256()
        base = self.tree / "lists"
        for p in sorted(base.rglob("*")):
            h.update(str(p.relative_to(base)).encode() + (p.read_bytes() if p.is_file() else b"/"))
        return h.hexdigest() + ",".join(sorted(p.name for p in self.tree.iterdir()))

    def generation(self) -> tuple:
        rel = Releases(self.state)
        return rel.live(), rel.generations()


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_happy_path_new_entries_decide_and_local_lists_stay(node: Node, tmp_path: Path) -> None:
    allow = (node.tree / "lists" / "allowlist" / "domains").read_bytes()
    assert node.explain("http://site7.adult.test/")["verdict"] == "allow"
    code, r = node.update(str(ut1(tmp_path / "ut1.tgz")), "--no-sync")
    assert code == 0 and r["layout"] == "UT1" and r["skipped"] == ["blacklists/porn"], r
    assert r["categories"]["adult"]["entries"] == 41 and r["categories"]["malware"]["before"] > 0, r
    d = node.explain("http://site7.adult.test/")
    assert d["verdict"] == "block" and d["category"] == "adult" and d["source"] == "lists/adult/domains:8", d
    assert node.explain("http://porn.test/videos/x")["verdict"] == "block"
    assert (node.tree / "lists" / "allowlist" / "domains").read_bytes() == allow
    assert not list(node.tree.glob(".lists*")) and not (node.state / "lists-update").exists()
    assert "sync" not in r and node.generation() == (1, [1])  # --no-sync: the next `appliance sync` cuts it


def test_mapping_and_selection_from_shallalist(node: Node, tmp_path: Path) -> None:
    node.edit(categories={"porn": "adult", "recreation/sports": "social"})
    code, r = node.update(str(shalla(tmp_path / "bl.tgz")), "--no-sync")
    assert code == 0 and r["layout"] == "Shallalist" and sorted(r["categories"]) == ["adult", "social"], r
    assert r["left"] == ["spyware"] and r["categories"]["social"]["from"] == ["recreation/sports"]
    assert node.explain("http://site3.porn.test/")["category"] == "adult"
    assert node.explain("http://site1.spy.test/")["verdict"] == "allow"  # not taken


def test_dry_run_changes_nothing(node: Node, tmp_path: Path) -> None:
    before = node.lists_digest()
    code, r = node.update(str(ut1(tmp_path / "ut1.tgz")), "--dry-run")
    assert code == 0 and r["dry_run"] and r["categories"]["adult"]["entries"] == 41 and "sync" not in r, r
    assert node.lists_digest() == before and node.generation() == (1, [1])


def _truncated(p: Path) -> Path:
    data = ut1(p, adult=3000).read_bytes()
    p.write_bytes(data[: len(data) - 40])
    return p


REFUSALS = [
    ("sha-mismatch", lambda t: [str(ut1(t / "u.tgz")), "--sha256", "0" * 64], None, "is not the expected"),
    ("truncated", lambda t: [str(_truncated(t / "u.tgz"))], None, "truncated"),
    ("empty-file", lambda t: [str(t / "empty.tgz")], None, "not a readable tarball"),
    ("empty-tarball", lambda t: [str(tarball(t / "e.tgz", {}))], None, "unknown layout"),
    ("empty-category", lambda t: [str(ut1(t / "u.tgz", extra={"blacklists/adult/domains": "", "blacklists/adult/urls": ""}))],
     None, "adult (from adult): 0 entries, below lists.min_entries (1)"),
    ("min-entries", lambda t: [str(ut1(t / "u.tgz"))], {"min_entries": 15}, "malware (from malware): 10 entries"),
    ("min-ratio", lambda t: [str(ut1(t / "u.tgz", adult=0))], {"min_ratio": 0.9, "min_entries": 1},
     "below lists.min_ratio (0.9)"),
    ("traversal", lambda t: [str(tarball(t / "x.tgz", {"blacklists/adult/domains": domains(50, "a"), "../../../tmp/x": "x"}))],
     None, "leads out of the archive"),
    ("unknown-layout", lambda t: [str(tarball(t / "x.tgz", {"lists.txt": "a.test\n"}))], None, "unknown layout"),
    ("mapped-missing", lambda t: [str(ut1(t / "u.tgz"))], {"categories": {"gambling": "adult"}}, "'gambling' not in"),
    ("http", lambda t: ["http://127.0.0.1:9/x.tgz"], None, "only https:// URLs"),
]


@pytest.mark.parametrize("name,argv,lists,needle", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_a_refusal_leaves_the_lists_and_the_generation(node: Node, tmp_path: Path, name, argv, lists, needle) -> None:
    (tmp_path / "empty.tgz").write_bytes(b"")
    if lists:
        node.edit(**lists)
    before, gen = node.lists_digest(), node.generation()
    code, r = node.update(*argv(tmp_path))
    assert code == 2 and r["ok"] is False and needle in r["error"], r
    assert node.lists_digest() == before and node.generation() == gen == (1, [1])
    assert "cut generation" not in (node.state / "sync" / "sync.log").read_text()
    plain = node.run("lists", "update", *argv(tmp_path))
    assert plain.returncode == 2 and "appliance: error:" in plain.stderr and "Traceback" not in plain.stderr


def test_a_backup_refuses_unless_forced(tmp_path: Path) -> None:
    node = Node(tmp_path, role="BACKUP")
    src = str(ut1(tmp_path / "ut1.tgz"))
    before = node.lists_digest()
    code, r = node.update(src)
    assert code == 2 and "is BACKUP, not MASTER" in r["error"] and "--force" in r["error"], r
    code, r = node.update(src, "--scheduled")
    assert code == 0 and "nothing to do" in r["skipped"], r
    assert node.update(src, "--scheduled", "--force")[0] == 2
    assert node.update(src, "--dry-run")[0] == 0  # changes nothing, so no role needed
    assert node.lists_digest() == before
    code, r = node.update(src, "--force")
    assert code == 0 and "sync" not in r and node.explain("http://site3.adult.test/")["verdict"] == "block", r
    assert node.generation() == (1, [1])


# ---------------------------------------------------------------- https


def _ca(d: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 signed by it."""
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60)
    ca, cakey, cert, key, csr = (d / n for n in ("ca.pem", "ca.key", "srv.pem", "srv.key", "srv.csr"))
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(cakey), "-out", str(ca), "-days", "2",
        "-subj", "/CN=carpguard test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(cakey), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(d / "ext"))
    return ca, cert, key


@pytest.fixture
def https_server(tmp_path: Path):
    ca, cert, key = _ca(tmp_path)
    files = {"/ut1.tgz": ut1(tmp_path / "ut1.tgz").read_bytes()}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *a) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{srv.server_address[1]}", ca, hashlib.sha256(files["/ut1.tgz"]).hexdigest()
    finally:
        srv.shutdown()
        srv.server_close()


def test_https_download_with_the_test_ca(node: Node, https_server) -> None:
    url, ca, sha = https_server
    env = {"APPLIANCE_LISTS_CA_FILE": str(ca)}
    before = node.lists_digest()
    code, r = node.update(f"{url}/ut1.tgz")  # the system's CAs do not know the test CA
    assert code == 2 and "certificate not trusted" in r["error"], r
    code, r = node.update(f"{url}/ut1.tgz", "--sha256", "f" * 64, env=env)
    assert code == 2 and "is not the expected" in r["error"], r
    code, r = node.update(f"{url}/missing.tgz", env=env)
    assert code == 1 and "HTTP 404" in r["error"], r
    assert node.lists_digest() == before
    node.edit(source=f"{url}/ut1.tgz", sha256=sha)  # lists.source and its pinned digest
    code, r = node.update("--no-sync", env=env)
    assert code == 0 and r["sha256"] == sha and r["kind"] == "url" and r["bytes"] > 0, r
    assert node.explain("http://site5.adult.test/")["verdict"] == "block"


def test_a_trickling_server_meets_the_deadline(tmp_path: Path, monkeypatch) -> None:
    """Review F7: the deadline was checked only after each 1 MiB read, so a byte a minute held the update forever;
    now each read returns what has arrived and the deadline is checked every time."""
    ca, cert, key = _ca(tmp_path)
    stop = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 20))
            self.end_headers()
            for _ in range(60):  # bounded: 30 s at most, stopped with the test
                if stop.wait(0.5):
                    return
                self.wfile.write(b"\x1f")
                self.wfile.flush()

        def log_message(self, *a) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("APPLIANCE_LISTS_CA_FILE", str(ca))
    t0 = time.monotonic()
    try:
        with pytest.raises(ListsError, match="the download took over 2 s"):
            fetch.download(f"https://127.0.0.1:{srv.server_address[1]}/x.tgz", tmp_path / "dl", deadline_s=2)
    finally:
        stop.set()
        srv.shutdown()
        srv.server_close()
    assert time.monotonic() - t0 < 10


def test_a_second_update_is_refused_while_one_runs(node: Node, tmp_path: Path) -> None:
    """Two updates shared <state>/lists-update and removed each other's work: one at a time (its own lock)."""
    run = node.state / "run"
    run.mkdir(exist_ok=True)
    work = node.state / "lists-update"
    work.mkdir()
    (work / "download").write_bytes(b"the running update's")
    fd = os.open(run / "lists-update.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"4242\n")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, r = node.update(str(ut1(tmp_path / "ut1.tgz")), "--no-sync")
    finally:
        os.close(fd)
    assert code == 5 and "another lists update is running (pid 4242" in r["error"], r
    assert (work / "download").read_bytes() == b"the running update's"
    code, r = node.update(str(ut1(tmp_path / "ut1.tgz")), "--no-sync")
    assert code == 0 and not work.exists(), r


# ---------------------------------------------------------------- the due script


@pytest.fixture
def due(tmp_path: Path, monkeypatch):
    return due_script.load("appliance-lists-due", "lists:\n  update_schedule: '* * * * *'\n", tmp_path, monkeypatch)


def test_due_master_updates(due, tmp_path: Path) -> None:
    write_role(Paths(tmp_path), "MASTER", 1, "lo")
    assert due.main() == 0
    assert due.execs == [[due.APPLIANCE, "-c", due.CONFIG, "lists", "update", "--scheduled", "--json"]]


@pytest.mark.parametrize("role", ["BACKUP", "INIT", None])
def test_due_never_on_a_backup(due, tmp_path: Path, role) -> None:
    if role:
        write_role(Paths(tmp_path), role, 1, "lo")
    assert due.main() == 0 and due.execs == []


def test_due_unset_schedule_or_not_due(due, tmp_path: Path, capsys) -> None:
    write_role(Paths(tmp_path), "MASTER", 1, "lo")
    Path(due.CONFIG).write_text("sync:\n  schedule: '* * * * *'\n")  # no lists.update_schedule: by hand only
    assert due.main() == 0 and due.execs == []
    assert due.cron().due("30 3 * * *", dt.datetime(2026, 6, 1, 3, 30))
    assert not due.cron().due("30 3 * * *", dt.datetime(2026, 6, 1, 3, 31))
    Path(due.CONFIG).write_text("lists:\n  update_schedule: 'nightly'\n")
    assert due.main() == 2 and due.execs == [] and "lists.update_schedule 'nightly'" in capsys.readouterr().err


def test_freebsd_cron_line_only_with_a_schedule() -> None:
    common = dict(schedule="*/5 * * * *", config="/usr/local/etc/appliance/appliance.yaml",
                  appliance_bin="/usr/local/bin/appliance")
    text = render.template("cron.j2", lists_schedule="30 3 * * *", **common)
    assert ("30 3 * * *\troot\t/usr/local/bin/appliance -c /usr/local/etc/appliance/appliance.yaml lists update "
            "--scheduled 2>&1 | /usr/bin/logger -t appliance-lists") in text
    assert "lists update" not in render.template("cron.j2", lists_schedule=None, **common)


@pytest.mark.parametrize("up,ok", [("recreation/sports", True), ("adult", True), ("a/../b", False), ("/adult", False),
                                   ("a/b/c/d", False)])
def test_upstream_names_in_the_map(tmp_path: Path, up: str, ok: bool) -> None:
    if ok:
        assert Lists(categories={up: "adult"}).categories == {up: "adult"}
    else:
        with pytest.raises(ValueError, match="upstream category"):
            Lists(categories={up: "adult"})
