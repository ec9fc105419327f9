"""Proxy peers in one run: e2guardian (HTTP, CONNECT), squid ssl-bump vs tls: intercept, memory (RSS, PSS, long run)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.bench import bench_filter as bf
from tests.bench.squid import CERTGEN, bump_options, squid_dir, write_squid_conf

ROUNDS = 3  # interleaved, order rotated; the median is reported
HTTP_SECONDS = 3
TLS_SECONDS = 3
E2G_ETC = Path("/etc/e2guardian")  # the Debian package's configuration: copied, paths rewritten, lists swapped
LONG_RUN = (10_000, 50_000)  # requests after which the long run samples the worker's memory


def load_avg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def tree(pid: int) -> list[int]:
    """pid and its descendants (squid's helpers, carpguard's workers, e2guardian's logger)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p)], capture_output=True, text=True).stdout.split()
        todo += [int(k) for k in kids]
    return out


def mem_of(pid: int) -> dict[str, int]:
    """KiB: VmRSS, VmHWM (peak RSS) and Pss (shared pages divided among the processes sharing them) of one process."""
    d = {"rss": 0, "hwm": 0, "pss": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                d["rss" if line.startswith("VmRSS") else "hwm"] = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                d["pss"] = int(line.split()[1])
    except OSError:
        pass
    return d


def tree_mem(pid: int) -> dict[str, int]:
    total = {"rss": 0, "hwm": 0, "pss": 0, "procs": 0}
    for p in tree(pid):
        for k, v in mem_of(p).items():
            total[k] += v
        total["procs"] += 1
    return total


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> dict[str, Path]:
    """An origin CA and its localhost leaf (for the TLS origin), and the bench CA squid ssl-bump signs with."""
    d.mkdir(parents=True, exist_ok=True)
    p = {n: d / n for n in ("origin-ca.pem", "origin-ca.key", "leaf.pem", "leaf.key", "leaf.csr", "bump-ca.pem", "bump-ca.key")}
    for name in ("origin-ca", "bump-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(p[f"{name}.key"]), "-out", str(p[f"{name}.pem"]),
                "-days", "2", "-subj", f"/CN=bench {name}")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(p["leaf.key"]), "-out", str(p["leaf.csr"]), "-subj", "/CN=localhost")
    ext = d / "leaf.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", str(p["leaf.csr"]), "-CA", str(p["origin-ca.pem"]), "-CAkey", str(p["origin-ca.key"]),
            "-CAcreateserial", "-days", "2", "-out", str(p["leaf.pem"]), "-extfile", str(ext))
    return p


def e2guardian_conf(root: Path, port: int, domains: Path) -> Path:
    """e2guardian on 127.0.0.1:port: the package's configuration with the 1M list as its bannedsitelist (a listed
    domain blocks its subdomains too, as in carpguard and squid's dstdomain), no logger, in the foreground."""
    etc = root / "e2guardian"
    shutil.copytree(E2G_ETC, etc)
    for f in etc.rglob("*"):
        if f.is_file():
            text = f.read_text(errors="replace")
            if str(E2G_ETC) in text:
                f.write_text(text.replace(str(E2G_ETC), str(etc)))
    conf = etc / "e2guardian.conf"
    text = conf.read_text()
    opts = {"filterip": "127.0.0.1", "filterports": str(port), "transparenthttpsport": str(bf.free_port()),
            "checkip": "127.0.0.1", "nodaemon": "on", "nologger": "on", "loglevel": "0", "logconnectionhandlingerrors": "off",
            "pidfilename": f"'{root / 'e2guardian.pid'}'"}
    for k, v in opts.items():
        text, n = re.subn(rf"^#?\s*{k}\s*=.*$", f"{k} = {v}", text, count=1, flags=re.M)
        if not n:
            text += f"\n{k} = {v}\n"
    conf.write_text(text)
    shutil.copy(domains, etc / "lists" / "bannedsitelist")
    for dirpath, dirs, files in os.walk(root):  # e2guardian drops root to its own user
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
    os.chmod(root, 0o755)
    return conf


def cfg_variant(root: Path, domains: Path, workers, tls: str = "sni") -> Path:
    cfg = bf.make_cfg(root, domains, workers)
    if tls != "sni":
        cfg.write_text(cfg.read_text().replace("proxy: {", f"proxy: {{tls: {tls}, ", 1))
    return cfg


def https_load(proxy_port: int, origin_port: int, seconds: float, cafile: Path, resume: bool, threads: int = 8,
               per_conn: int = 10) -> dict:
    """CONNECT, TLS verified against `cafile` (the proxy's CA: the proxy mints the certificate), `per_conn` keep-alive
    GETs, repeated by each thread until time is up; `resume`: each thread offers its last TLS session again."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    counts = {"req": 0, "conn": 0, "err": 0, "resumed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    # by name: an intercepting proxy checks the request inside TLS against the CONNECT target (carpguard answers 409)
    req = f"GET / HTTP/1.1\r\nHost: localhost:{origin_port}\r\n\r\n".encode()
    errors: list[str] = []

    def worker() -> None:
        n = {"req": 0, "conn": 0, "err": 0, "resumed": 0}
        session = None
        while time.monotonic() < deadline:
            try:
                s = bf.open_tunnel(proxy_port, f"localhost:{origin_port}")
                with ctx.wrap_socket(s, server_hostname="localhost", session=session if resume else None) as t:
                    n["conn"] += 1
                    n["resumed"] += t.session_reused
                    for _ in range(per_conn):
                        t.sendall(req)
                        bf.read_answer(t)
                        n["req"] += 1
                    session = t.session
            except (OSError, ssl.SSLError, ValueError) as e:
                n["err"] += 1
                if len(errors) < 3:
                    errors.append(repr(e))
        with lock:
            for k, v in n.items():
                counts[k] += v

    t0 = time.monotonic()
    ths = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(seconds + 30)
    el = time.monotonic() - t0
    return {"rps": counts["req"] / el, "cps": counts["conn"] / el, "errors": counts["err"], "first_errors": errors,
            "resumed": counts["resumed"] / max(1, counts["conn"])}


def cpu_of(pid: int) -> float:
    """User+system CPU seconds of pid and its descendants (live ones: read from /proc/PID/stat)."""
    total = 0
    for p in tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def measured(pid: int, seconds: float, fn) -> dict:
    """fn()'s result plus the proxy's requests per CPU-second of its process tree during it."""
    c0 = cpu_of(pid)
    r = fn()
    cpu = cpu_of(pid) - c0
    r["per_cpu"] = r["rps"] * seconds / cpu if cpu > 0 else float("nan")
    return r


def long_run(port: int, pid: int, origin_port: int, tmp: Path) -> list[tuple[int, dict]]:
    """wrk in 2 s slices until LONG_RUN[-1] requests went through; the tree's memory when each mark is passed."""
    done, marks, out = 0, list(LONG_RUN), []
    for _ in range(200):  # bounded: 400 s at most
        out_wrk = subprocess.run(["wrk", "-t2", "-c32", "-d2s", "-s", str(tmp / "proxy.lua"), f"http://127.0.0.1:{port}/"],
                                 capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"(\d+) requests in", out_wrk)
        done += int(m.group(1)) if m else 0
        while marks and done >= marks[0]:
            out.append((marks.pop(0), tree_mem(pid)))
        if not marks:
            break
    return out


def answer(port: int, head: bytes) -> str:
    """What a proxy answers to one request: its status, "+origin" when the origin's body came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        got = b""
        while len(got) < 65536:
            c = s.recv(65536)
            if not c or (head.startswith(b"CONNECT") and b"\r\n\r\n" in got + c):
                got += c
                break
            got += c
    status = got.split(b" ", 2)[1].decode() if got.count(b" ") >= 2 else "?"
    return status + ("+origin" if b"x" * 64 in got else "")


def start_all(peers: dict, origin_port: int, env: dict) -> tuple[dict, dict]:
    """Each peer started and timed to its first proxied response, one after another (start-ups do not compete)."""
    ports, firsts = {}, {}
    try:
        for name, (_, cmd, _) in peers.items():
            port = bf.free_port()
            firsts[name], p = bf.first_response(cmd(port), port, origin_port, env, timeout=180)
            ports[name] = (port, p)
    except BaseException:  # the ones already running are stopped here: the caller never sees them
        for _, p in ports.values():
            bf.stop(p)
        raise
    return ports, firsts


def run_rounds(peers: dict, ports: dict, origin_port: int, tls_port: int, tmp: Path, cafile: dict) -> dict:
    runs: dict[str, list] = {n: [] for n in peers}
    names = list(peers)
    for rnd in range(ROUNDS):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            port, p = ports[name]
            if peers[name][2] == "plain":
                bf.wrk(port, origin_port, tmp, 1)
                r = {"http": measured(p.pid, HTTP_SECONDS, lambda: bf.wrk(port, origin_port, tmp, HTTP_SECONDS)),
                     "tls": measured(p.pid, TLS_SECONDS, lambda: bf.tls_load(port, tls_port, TLS_SECONDS))}
            else:
                r = {"new": measured(p.pid, TLS_SECONDS, lambda: https_load(port, tls_port, TLS_SECONDS, cafile[name], False)),
                     "resumed": measured(p.pid, TLS_SECONDS, lambda: https_load(port, tls_port, TLS_SECONDS, cafile[name], True))}
            runs[name].append(r)
        print(f"round {rnd + 1}/{ROUNDS} (load {load_avg()}): " + ", ".join(
            f"{n} " + "/".join(f"{v['rps']:,.0f}" for v in runs[n][-1].values()) for n in names), flush=True)
    res = {}
    for name, rs in runs.items():
        res[name] = {k: {f: bf.median([r[k][f] for r in rs]) for f in ("rps", "per_cpu")} for k in rs[0]}
        for k in rs[0]:
            errs = [r[k]["errors"] for r in rs if r[k]["errors"] not in (0, "none")]
            if errs:
                print(f"  ({name} {k}: errors per round {errs} {rs[-1][k].get('first_errors', '')})")
            if "resumed" in rs[0][k]:
                res[name][k]["resumed"] = bf.median([r[k]["resumed"] for r in rs])
    return res


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    os.chmod(tmp, 0o755)  # squid and e2guardian drop root to their own users: they must reach their files
    procs: list = []
    ports: dict = {}
    try:
        print(f"{os.cpu_count()} cores shared by the proxies, origins and load generators; load average before the run"
              f" {load_avg()} (compare the ratios: every figure is from this one run)", flush=True)
        e2g, certgen = shutil.which("e2guardian", path=os.environ.get("PATH", "") + ":/usr/sbin"), Path(CERTGEN).exists()
        squid = shutil.which("squid", path=os.environ.get("PATH", "") + ":/usr/sbin")
        dom_file = tmp / "domains"
        domains = bf.gen_domains(dom_file, bf.N_DOMAINS)
        pki = make_pki(tmp / "pki")
        cfgs = {"cg": cfg_variant(tmp / "cg", dom_file, 1), "cg_auto": cfg_variant(tmp / "cg-auto", dom_file, "auto"),
                "cg_tls": cfg_variant(tmp / "cg-tls", dom_file, 1, "intercept")}
        env = {**os.environ, "APPLIANCE_STATE_DIR": str(tmp / "state")}
        for cfg in cfgs.values():
            subprocess.run([bf.APPLIANCE, "-c", str(cfg), "check", "--compile"], check=True, capture_output=True, timeout=300,
                           env=env)
        origin_port, tls_port = bf.free_port(), bf.free_port()
        procs.append(subprocess.Popen([bf.PY, "-c", bf.ORIGIN, str(origin_port)]))
        procs.append(subprocess.Popen([bf.PY, "-c", bf.ORIGIN, str(tls_port), str(pki["leaf.pem"]), str(pki["leaf.key"])]))
        bf.wait_port(origin_port)
        bf.wait_port(tls_port)
        env["APPLIANCE_PROXY_TEST_REACH"] = f"127.0.0.1:{origin_port},127.0.0.1:{tls_port}"
        env["APPLIANCE_PROXY_TEST_UPSTREAM_CA"] = str(pki["origin-ca.pem"])  # filters/proxy/lean.py
        appliance = lambda c: lambda p: [bf.APPLIANCE, "-c", str(cfgs[c]), "proxy", "--listen", f"127.0.0.1:{p}"]  # noqa: E731
        peers: dict[str, tuple] = {
            "carpguard": ("carpguard, workers: 1", appliance("cg"), "plain"),
            "carpguard_auto": (f"carpguard, workers: auto ({os.cpu_count()})", appliance("cg_auto"), "plain"),
            "squid": ("squid -N (dstdomain ACL)", lambda p: [squid, "-N", "-f", str(bf.squid_conf(tmp / "sq", p, dom_file))],
                      "plain"),
            "e2guardian": ("e2guardian (threads, bannedsitelist)",
                           lambda p: [e2g, "-N", "-c", str(e2guardian_conf(tmp / "e2g", p, dom_file))], "plain"),
            "carpguard_tls": ("carpguard, workers: 1, tls: intercept", appliance("cg_tls"), "bump"),
            "squid_bump": ("squid -N ssl-bump (bump all)", lambda p: [squid, "-N", "-f", str(bump_conf(tmp / "sqb", p, dom_file, pki))],
                           "bump"),
        }
        for name, present, why in (("squid", squid, "squid"), ("squid_bump", squid and certgen, "squid-openssl"),
                                   ("e2guardian", e2g, "e2guardian")):
            if not present:
                print(f"{why} not installed: no {name} figures")
                del peers[name]
        ports, firsts = start_all(peers, origin_port, env)
        cafile = {"carpguard_tls": cfgs["cg_tls"].parent / "ca" / "mitmproxy-ca-cert.pem", "squid_bump": pki["bump-ca.pem"]}
        blocked = f"www.{domains[123]}"
        checks = {n: (answer(p, f"GET http://{blocked}/ HTTP/1.1\r\nHost: {blocked}\r\nConnection: close\r\n\r\n".encode()),
                      answer(p, f"CONNECT {blocked}:443 HTTP/1.1\r\nHost: {blocked}:443\r\n\r\n".encode()))
                  for n, (p, _) in ports.items()}
        print("fairness, a listed domain (GET, CONNECT): " + ", ".join(f"{n} {a}/{b}" for n, (a, b) in checks.items()))
        res = run_rounds(peers, ports, origin_port, tls_port, tmp, cafile)
        mem = {n: tree_mem(p.pid) for n, (_, p) in ports.items()}
        report(peers, res, mem, firsts)
        for name in [n for n in ports if n not in ("carpguard", "carpguard_tls")]:
            bf.stop(ports.pop(name)[1])
        port, p = ports["carpguard"]
        print(f"\nlong run, carpguard workers: 1 (HTTP, wrk -c32; load {load_avg()}): "
              + "; ".join(f"after {n:,} requests RSS {m['rss'] / 1024:.0f} MB, PSS {m['pss'] / 1024:.0f} MB"
                          for n, m in [(0, tree_mem(p.pid))] + long_run(port, p.pid, origin_port, tmp)))
    finally:
        for _, p in ports.values():
            bf.stop(p)
        for p in procs:
            bf.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def bump_conf(root: Path, port: int, domains: Path, pki: dict) -> Path:
    acl = squid_dir(root) / "blocked.acl"
    with open(domains) as src, open(acl, "w") as dst:
        for line in src:
            dst.write("." + line)
    os.chmod(acl, 0o644)
    port_opts, extra = bump_options(root, pki["bump-ca.pem"], pki["bump-ca.key"], pki["origin-ca.pem"])
    return write_squid_conf(root, port, acls=f'acl blocked dstdomain "{acl}"\n', port_opts=port_opts,
                            rules="acl SSL_ports port 443 1-65535\nacl CONNECT method CONNECT\nhttp_access deny blocked\n",
                            extra=extra + "dns_v4_first on\n")


def report(peers: dict, res: dict, mem: dict, firsts: dict) -> None:
    print(f"\nmedian of {ROUNDS} interleaved rounds; plain peers: wrk {HTTP_SECONDS} s (32 connections, 1 KB) then {TLS_SECONDS} s"
          f" CONNECT+TLS tunnels (8 threads, 10 requests each); interception peers: {TLS_SECONDS} s of HTTPS through the"
          " proxy's own certificates (client verifies against its CA), new TLS sessions, then resumed ones")
    print(f"{'proxy':<40} {'HTTP/CONNECT or new/resumed req/s':>34} {'req per CPU-s':>18} {'RSS':>6} {'peak':>6} {'PSS':>6}"
          f" {'procs':>5} {'1st':>6}")
    for n, v in res.items():
        a, b = list(v.values())
        m = mem[n]
        print(f"{peers[n][0]:<40} {a['rps']:>16,.0f} / {b['rps']:>15,.0f} {a['per_cpu']:>8,.0f} / {b['per_cpu']:>7,.0f}"
              f" {m['rss'] / 1024:>4.0f}MB {m['hwm'] / 1024:>4.0f}MB {m['pss'] / 1024:>4.0f}MB {m['procs']:>5} {firsts[n]:>5.2f}s")

    def ratio(a: str, b: str, kind: str, f: str = "rps") -> str:
        return f"{res[a][kind][f] / res[b][kind][f]:.2f}x" if a in res and b in res and res[b][kind][f] else "n/a"

    print("\nratios (same run):")
    print(f"HTTP    carpguard 1 worker / squid -N:        {ratio('carpguard', 'squid', 'http')}  [target >= 0.3x];"
          f" per CPU-second {ratio('carpguard', 'squid', 'http', 'per_cpu')}")
    print(f"CONNECT carpguard 1 worker / squid -N:        {ratio('carpguard', 'squid', 'tls')}  [target >= 1x];"
          f" per CPU-second {ratio('carpguard', 'squid', 'tls', 'per_cpu')}")
    print(f"HTTP    carpguard auto / e2guardian (box):    {ratio('carpguard_auto', 'e2guardian', 'http')}  [target >= 1x]")
    print(f"CONNECT carpguard auto / e2guardian (box):    {ratio('carpguard_auto', 'e2guardian', 'tls')}")
    print(f"HTTP    carpguard 1 worker / e2guardian:      {ratio('carpguard', 'e2guardian', 'http')};"
          f" per CPU-second {ratio('carpguard', 'e2guardian', 'http', 'per_cpu')}")
    print(f"HTTPS   intercept / squid ssl-bump, new TLS:  {ratio('carpguard_tls', 'squid_bump', 'new')}  [target >= 1x];"
          f" per CPU-second {ratio('carpguard_tls', 'squid_bump', 'new', 'per_cpu')}")
    print(f"HTTPS   intercept / squid ssl-bump, resumed:  {ratio('carpguard_tls', 'squid_bump', 'resumed')};"
          f" per CPU-second {ratio('carpguard_tls', 'squid_bump', 'resumed', 'per_cpu')}")
    for n in ("carpguard_tls", "squid_bump"):
        if n in res:
            print(f"  {n}: sessions resumed when offered: {res[n]['resumed']['resumed']:.0%}")
    if "squid" in mem:
        for n in ("carpguard", "carpguard_auto"):
            print(f"memory {n} / squid -N: peak RSS (sum of VmHWM) {mem[n]['hwm'] / mem['squid']['hwm']:.2f}x, "
                  f"PSS {mem[n]['pss'] / mem['squid']['pss']:.2f}x  [target peak <= 1x with one worker]")
