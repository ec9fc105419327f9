"""`make deb`: build dist/carpguard_<version>_amd64.deb, a virtualenv on Debian's python3 in /opt/carpguard (the
dh-virtualenv layout) plus the systemd units, maintainer scripts and config templates in packaging/debian/.

Reproducible: the package is built from the last commit (`git archive HEAD`, not the work tree), with
SOURCE_DATE_EPOCH = that commit's time, every mtime clamped to it, fixed modes, root:root owners, no .pyc (postinst
compiles them), and the staging path rewritten to /opt/carpguard. Wheels come from a cache outside the repo
(~/.cache/carpguard/wheels, or $CARPGUARD_CACHE/wheels): a second build does no network work.

Usage: python packaging/build_deb.py [--out dist] [--commit REV] [--relock]     (needs dpkg-deb and /usr/bin/python3 with venv)
"""
from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEB = REPO / "packaging" / "debian"
LOCK = REPO / "packaging" / "requirements.lock"
BUILD_REQS = ["setuptools==84.2.1", "wheel==0.48.0"]  # what builds carpguard's own wheel (and sdist-only deps)
PYTHON = "/usr/bin/python3"  # Debian's interpreter: the venv's bin/python links to it
PREFIX = "/opt/carpguard"
UNITS = ["appliance-proxy.service", "appliance-carp.service", "appliance-sync.service", "appliance-sync.timer",
         "appliance-lists-update.service", "appliance-lists-update.timer", "appliance-admin.service"]
SYNC_USER = "appliance-sync"  # the cluster file's default sync.user
APPLIANCE_BIN = "/usr/bin/appliance"
MARK = "carpguard package"  # first line of every file postinst writes; postrm purges only those


class BuildError(Exception):
    pass


def cache_dir() -> Path:
    base = Path(os.environ.get("CARPGUARD_CACHE") or Path.home() / ".cache" / "carpguard")
    return base / "wheels"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def git(*args: str) -> str:
    return run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def version(rev: str = "HEAD") -> str:
    return tomllib.loads(git("show", f"{rev}:pyproject.toml"))["project"]["version"]


def export_source(dst: Path, rev: str = "HEAD") -> None:
    """The committed tree of `rev`: what a fresh clone would build, whatever is being edited in the work tree."""
    archive = run(["git", "-C", str(REPO), "archive", "--format=tar", rev], capture_output=True).stdout
    run(["tar", "-x", "-C", str(dst)], input=archive)


def pip(venv: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return run([str(venv / "bin" / "python"), "-m", "pip", *args], env=env, **kw)


def fetch(venv: Path, lock: Path, cache: Path) -> bool:
    """Fill the wheel cache; returns True when it had to go to the network (PyPI). One build at a time fills it
    (an flock on <cache>/.fetch.lock): two builds at once (make test's workers) never write one wheel together."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".fetch.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        return _fetch(venv, lock, cache)


def _fetch(venv: Path, lock: Path, cache: Path) -> bool:
    reqs = ["-r", str(lock), *BUILD_REQS]
    offline = pip(venv, "download", "-q", "--no-index", "--find-links", str(cache), "-d", str(cache), *reqs,
                  check=False, capture_output=True)
    online = offline.returncode != 0
    if online:
        print(f"build_deb: fetching wheels into {cache}", file=sys.stderr)
        pip(venv, "download", "-q", "-d", str(cache), *reqs)
    # sdist-only requirements become wheels once, in the cache (offline: the build backends are cached too)
    pip(venv, "wheel", "-q", "--no-index", "--find-links", str(cache), "-w", str(cache), "--use-pep517", "-r", str(lock))
    return online


def make_venv(target: Path, src: Path, cache: Path) -> bool:
    """The venv at `target` (a staging dir), then rewritten so it works at PREFIX. Returns fetch()'s answer."""
    run([PYTHON, "-m", "venv", str(target)])
    online = fetch(target, LOCK, cache)
    common = ["install", "-q", "--no-index", "--find-links", str(cache), "--no-compile"]
    pip(target, *common, "--only-binary=:all:", "-r", str(LOCK))
    pip(target, *common, "--no-deps", "--use-pep517", str(src))
    pip(target, "uninstall", "-q", "-y", "pip", "setuptools")
    relocate(target)
    strip(target)
    return online


def relocate(venv: Path) -> None:
    """No bytecode, no build paths: shebangs, activate scripts and pyvenv.cfg name PREFIX; direct_url.json goes."""
    for d in sorted(venv.rglob("__pycache__"), reverse=True):
        shutil.rmtree(d)
    for p in venv.rglob("*.pyc"):
        p.unlink()
    for p in venv.rglob("direct_url.json"):
        record = p.parent / "RECORD"
        if record.exists():
            lines = [l for l in record.read_text().splitlines(keepends=True) if not l.startswith(f"{p.parent.name}/direct_url.json,")]
            record.write_text("".join(lines))
        p.unlink()
    old = str(venv).encode()
    rewritten: set[Path] = set()
    for p in sorted(venv.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        data = p.read_bytes()
        if old not in data:
            continue
        if p.parent.name != "bin" and p.name != "pyvenv.cfg":
            raise BuildError(f"{p}: holds the staging path {venv} and is not a script the build knows how to fix")
        p.write_bytes(data.replace(old, PREFIX.encode()))
        rewritten.add(p.resolve())
    fix_records(venv, rewritten)
    for link in sorted((venv / "bin").iterdir()):  # python3 -> /usr/bin/python3.11: the ABI the wheels were built for
        if link.is_symlink() and os.readlink(link) == PYTHON:
            link.unlink()
            os.symlink(os.path.realpath(PYTHON), link)
    cfg = venv / "pyvenv.cfg"  # `command = /usr/bin/python3 -m venv <staging>`: keep what a reader needs
    cfg.write_text("".join(l for l in cfg.read_text().splitlines(keepends=True) if not l.startswith("command")))


def fix_records(venv: Path, changed: set[Path]) -> None:
    """RECORD names the scripts pip wrote with the staging path: give them the hash and size of the fixed files."""
    import base64

    for record in sorted(venv.glob("lib/python3*/site-packages/*.dist-info/RECORD")):
        out = []
        for line in record.read_text().splitlines(keepends=True):
            path, _, rest = line.partition(",")
            target = (record.parent.parent / path).resolve()
            if target in changed:
                data = target.read_bytes()
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                line = f"{path},sha256={digest},{len(data)}\n"
            out.append(line)
        record.write_text("".join(out))


def strip(venv: Path) -> None:
    """What dh_strip does to the wheels' extension modules: no debug symbols (a third of the venv), same bytes each time."""
    tool = shutil.which("strip")
    if not tool:
        raise BuildError("strip: not found (apt-get install binutils)")
    for so in sorted(venv.rglob("*.so")):
        if so.is_file() and not so.is_symlink() and so.read_bytes()[:4] == b"\x7fELF":
            run([tool, "--strip-unneeded", "--remove-section=.comment", "--remove-section=.note", str(so)])


def render_sync_access(src: Path) -> tuple[str, str]:
    """The sshd Match block and the sudoers lines, from the same sync.keys functions `appliance keys init` uses."""
    code = ("import json, sys; from sync import keys; "
            f"print(json.dumps([keys.serve_command({APPLIANCE_BIN!r}, 'sudo'), "
            f"keys.sudoers_rules({SYNC_USER!r}, {APPLIANCE_BIN!r})]))")
    import json

    out = run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(src)!r}); {code}"],
              capture_output=True, text=True, cwd=src).stdout
    forced, rules = json.loads(out)
    sshd = (f"# {MARK}: the config sync user runs only the sync command (removed on purge)\n"
            f"Match User {SYNC_USER}\n"
            f"\tForceCommand {forced}\n"
            "\tPermitTTY no\n\tDisableForwarding yes\n\tPermitTunnel no\n\tPermitUserRC no\n"
            "\tAuthenticationMethods publickey\n\tPasswordAuthentication no\n\tKbdInteractiveAuthentication no\n")
    sudoers = (f"# {MARK}: {SYNC_USER} may run exactly `{APPLIANCE_BIN} sync-serve` as root (removed on purge)\n"
               + "".join(r + "\n" for r in rules))
    return sshd, sudoers


def gz(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def put(root: Path, path: str, data: bytes | str, mode: int = 0o644) -> None:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    p.chmod(mode)


def lay_out(root: Path, src: Path, ver: str, commit: str, epoch: int, maint: str) -> None:
    for name in ("appliance-proxy-start", "appliance-sync-due", "appliance-lists-due"):
        put(root, f"{PREFIX}/libexec/{name}", (DEB / "libexec" / name).read_bytes(), 0o755)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    os.symlink(f"{PREFIX}/bin/appliance", root / "usr/bin/appliance")
    for unit in UNITS:
        put(root, f"/lib/systemd/system/{unit}", (DEB / "units" / unit).read_bytes())
    put(root, "/etc/logrotate.d/appliance", (DEB / "logrotate").read_bytes())
    sshd, sudoers = render_sync_access(src)
    put(root, "/usr/share/carpguard/sshd-appliance-sync.conf", sshd)
    put(root, "/usr/share/carpguard/sudoers-appliance", sudoers)
    doc = "/usr/share/doc/carpguard"
    put(root, f"{doc}/copyright", (DEB / "copyright").read_bytes())
    date = run(["date", "-u", "-R", "-d", f"@{epoch}"], capture_output=True, text=True).stdout.strip()
    changelog = (DEB / "changelog").read_text().replace("@VERSION@", ver).replace("@COMMIT@", commit[:12]).replace("@DATE@", date).replace("@MAINTAINER@", maint)
    put(root, f"{doc}/changelog.gz", gz(changelog.encode()))
    put(root, f"{doc}/README.Debian", (DEB / "README.Debian").read_bytes())
    put(root, f"{doc}/requirements.lock", LOCK.read_bytes())
    put(root, "/usr/share/lintian/overrides/carpguard", (DEB / "lintian-overrides").read_bytes())


EXEC_DIRS = (f"{PREFIX}/bin", f"{PREFIX}/libexec")  # the only executables; a wheel's stray +x bits are dropped


def normalise(root: Path, epoch: int) -> None:
    """Dirs 0755, files 0644 except scripts in EXEC_DIRS (0755); every mtime = SOURCE_DATE_EPOCH."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            if p.is_dir():
                p.chmod(0o755)
            else:
                sourced = p.name.lower().startswith("activate")  # bin/activate*: read by a shell, never run
                p.chmod(0o755 if f"/{p.parent.relative_to(root)}" in EXEC_DIRS and not sourced else 0o644)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def control_files(root: Path, ver: str, maint: str) -> None:
    debian = root / "DEBIAN"
    debian.mkdir()
    files, size = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (dirpath == str(root) and d == "DEBIAN"))
        for name in sorted(filenames) + dirnames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                size += (p.stat().st_size + 1023) // 1024
                files.append(p)
            else:
                size += 1
    conffiles = ["/etc/logrotate.d/appliance"]
    md5 = "".join(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n"
                  for p in sorted(files) if f"/{p.relative_to(root)}" not in conffiles)
    control = (DEB / "control.in").read_text().replace("@VERSION@", ver).replace("@INSTALLED_SIZE@", str(size)).replace("@MAINTAINER@", maint)
    put(root, "DEBIAN/control", control)
    put(root, "DEBIAN/md5sums", md5)
    put(root, "DEBIAN/conffiles", "".join(c + "\n" for c in conffiles))
    for script in ("postinst", "prerm", "postrm"):
        put(root, f"DEBIAN/{script}", (DEB / script).read_bytes(), 0o755)


def build(out: Path, cache: Path, rev: str = "HEAD") -> tuple[Path, bool]:
    for tool in ("dpkg-deb", "git", PYTHON):
        if not shutil.which(tool):
            raise BuildError(f"{tool}: not found (apt-get install dpkg-dev git python3-venv)")
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    ver, epoch = version(commit), int(git("log", "-1", "--format=%ct", commit))
    # Debian's convention (dch): DEBFULLNAME/DEBEMAIL, else the packaged commit's author
    maint = (f"{os.environ['DEBFULLNAME']} <{os.environ['DEBEMAIL']}>" if os.environ.get("DEBFULLNAME") and os.environ.get("DEBEMAIL")
             else git("log", "-1", "--format=%an <%ae>", commit))
    with tempfile.TemporaryDirectory(prefix="carpguard-deb.") as tmp:
        tmp = Path(tmp)
        src, root = tmp / "src", tmp / "root"
        src.mkdir()
        export_source(src, commit)
        staging = tmp / "venv"
        online = make_venv(staging, src, cache)
        (root / PREFIX.lstrip("/")).parent.mkdir(parents=True)
        shutil.move(str(staging), root / PREFIX.lstrip("/"))
        lay_out(root, src, ver, commit, epoch, maint)
        normalise(root, epoch)
        control_files(root, ver, maint)
        normalise(root / "DEBIAN", epoch)
        for script in ("postinst", "prerm", "postrm"):
            (root / "DEBIAN" / script).chmod(0o755)
        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"carpguard_{ver}_amd64.deb"
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
        # gzip: deterministic whatever the core count (dpkg switches xz between its single- and multi-threaded
        # encoders, whose bytes differ) and 4x faster than xz here; the .deb is ~35 MB instead of ~25 MB
        run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z6", "--build", str(root), str(deb)], env=env,
            stdout=subprocess.DEVNULL)
    return deb, online


def relock(cache: Path) -> None:
    """Resolve pyproject's dependencies afresh with Debian's python3 and rewrite packaging/requirements.lock."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    with tempfile.TemporaryDirectory(prefix="carpguard-lock.") as tmp:
        venv = Path(tmp) / "venv"
        run([PYTHON, "-m", "venv", str(venv)])
        pip(venv, "download", "-q", "-d", str(cache), *deps, *BUILD_REQS)
        pip(venv, "install", "-q", "--no-index", "--find-links", str(cache), *deps)
        frozen = pip(venv, "freeze", capture_output=True, text=True).stdout
    head = [l for l in LOCK.read_text().splitlines(keepends=True) if l.startswith("#")]
    LOCK.write_text("".join(head) + frozen)
    print(f"wrote {LOCK}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "dist"), help="output directory [dist/]")
    ap.add_argument("--commit", default="HEAD", help="the commit to package [HEAD]")
    ap.add_argument("--relock", action="store_true", help="re-resolve packaging/requirements.lock (network)")
    args = ap.parse_args(argv)
    try:
        if args.relock:
            relock(cache_dir())
            return 0
        deb, online = build(Path(args.out), cache_dir(), args.commit)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"build_deb: error: {e}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    print(f"{deb}  sha256 {digest}  ({'fetched wheels' if online else 'offline: wheel cache only'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
