"""The Debian root tree: mmdebstrap's base (cached as a tar, its .debs kept), the carpguard .deb installed into it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from image.errors import BuildError, MissingTool

SUITES = {"12": "bookworm"}
VARIANT = "minbase"
# what a node needs to boot and run the appliance with no network; the .deb's Depends are among them
PACKAGES = ("linux-image-amd64", "initramfs-tools", "systemd", "systemd-sysv", "udev", "kmod", "e2fsprogs", "dbus",
            "openssh-server", "openssh-client", "rsync", "sudo", "iproute2", "iputils-arping", "iputils-ping", "ucarp",
            "python3", "python3.11", "adduser", "init-system-helpers", "util-linux", "logrotate", "procps", "curl",
            "netbase", "grub-pc-bin", "grub-efi-amd64-bin", "grub2-common")
# the host's, and the lists apt fetched: never part of the image (mmdebstrap documents the first two)
SOURCES_LIST = ("deb http://deb.debian.org/debian {s} main\n"
                "deb http://deb.debian.org/debian {s}-updates main\n"
                "deb http://security.debian.org/debian-security {s}-security main\n")
# files whose bytes depend on when or where they were made, not on what was installed
UNSTABLE = ("etc/resolv.conf", "etc/hostname", "var/cache/ldconfig/aux-cache", "var/log/dpkg.log",
            "var/log/alternatives.log", "var/log/apt/history.log", "var/log/apt/term.log", "var/log/apt/eipp.log.xz",
            "etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-", "var/lib/dpkg/status-old",
            "var/lib/dpkg/diversions-old", "var/lib/dpkg/statoverride-old", "var/cache/debconf/config.dat-old",
            "var/cache/debconf/templates.dat-old", "var/lib/systemd/random-seed", "var/lib/dbus/machine-id")


def cache_root() -> Path:
    """$CARPGUARD_CACHE/debian, else ~/.cache/carpguard/debian: never the repo."""
    return Path(os.environ.get("CARPGUARD_CACHE") or Path.home() / ".cache" / "carpguard") / "debian"


def tool(name: str, package: str) -> str:
    exe = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if exe is None:
        raise MissingTool(name, package, "to build the Debian image")
    return exe


def run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise BuildError(f"{what} failed ({Path(cmd[0]).name} exit {r.returncode}):\n{tail}")
    return r


def base_key(release: str, epoch: int) -> str:
    doc = {"suite": SUITES[release], "variant": VARIANT, "packages": sorted(PACKAGES), "epoch": epoch, "v": 2}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _local_repo(archives: Path, repo: Path) -> bool:
    """A flat file:// repository of the cached .debs (the versions the last online build used); False if none."""
    debs = sorted(archives.glob("*.deb"))
    if not debs:
        return False
    repo.mkdir(parents=True, exist_ok=True)
    scan = run([tool("dpkg-scanpackages", "dpkg-dev"), "-m", "."], "dpkg-scanpackages", cwd=archives)
    (repo / "Packages").write_text(scan.stdout)
    return True


def _mmdebstrap(release: str, epoch: int, archives: Path, out: Path, mirror: str | None) -> None:
    suite = SUITES[release]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    cmd = [tool("mmdebstrap", "mmdebstrap"), f"--variant={VARIANT}", "--mode=root", "--format=tar",
           f"--include={','.join(PACKAGES)}", "--aptopt=Acquire::Languages \"none\"",
           "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
           "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
           "--skip=download/empty", "--skip=essential/unlink",
           "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
           f"--setup-hook=sync-in {archives} /var/cache/apt/archives/",
           f"--customize-hook=sync-out /var/cache/apt/archives {archives}",
           "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb \"$1\"/etc/ssh/ssh_host_*",
           f"--customize-hook=printf '{SOURCES_LIST.format(s=suite)}' > \"$1\"/etc/apt/sources.list",
           "--customize-hook=rm -f \"$1\"/etc/resolv.conf \"$1\"/etc/hostname",
           "--customize-hook=printf 'uninitialized\\n' > \"$1\"/etc/machine-id",
           suite, str(out)]
    if mirror:  # the automount hook makes the file:// repository visible inside the chroot
        cmd[1:1] = ["--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount"]
        cmd += [f"deb [trusted=yes] {mirror} ./"]
    else:
        cmd += ["http://deb.debian.org/debian"]
    run(cmd, "mmdebstrap", env=env, timeout=3600)


def base_tar(release: str, epoch: int, log=print) -> tuple[Path, dict[str, str]]:
    """The cached base tar and its package versions; built on a miss: from the cached .debs when they hold a
    complete set (offline, the recorded versions), else from deb.debian.org (recording them)."""
    root = cache_root()
    key = base_key(release, epoch)
    tar, versions = root / f"base-{key}.tar", root / f"base-{key}.versions.json"
    if tar.exists() and versions.exists():
        return tar, json.loads(versions.read_text())
    archives = root / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    part = tar.with_suffix(".tar.part")
    repo = root / "repo"
    try:
        if _local_repo(archives, repo):
            try:
                log(f"mmdebstrap {SUITES[release]} from the cached packages in {archives} (offline)")
                _mmdebstrap(release, epoch, archives, part, f"file://{archives}")
            except BuildError as e:
                log(f"the cached packages are not a complete set ({str(e).splitlines()[-1][:120]}); using the mirror")
                _mmdebstrap(release, epoch, archives, part, None)
        else:
            log(f"mmdebstrap {SUITES[release]} from deb.debian.org (packages cached in {archives})")
            _mmdebstrap(release, epoch, archives, part, None)
        found = package_versions_tar(part)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    versions.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    part.rename(tar)
    return tar, found


def package_versions_tar(tar: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="cg-status.") as tmp:
        run(["tar", "-xf", str(tar), "-C", tmp, "./var/lib/dpkg/status"], "tar")
        return package_versions(Path(tmp))


def package_versions(root: Path) -> dict[str, str]:
    """{package: version} of every installed package, as dpkg-query --admindir reads them."""
    r = run([tool("dpkg-query", "dpkg"), f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n"],
            "dpkg-query")
    out = {}
    for line in r.stdout.splitlines():
        name, ver, status = line.split("\t")
        if status.startswith("ii"):
            out[name] = ver
    return out
