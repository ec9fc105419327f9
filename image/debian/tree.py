"""The shared Debian tree of one build: the cached base, the carpguard .deb installed in it, then normalised."""
from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from appliance.core import model as config_model
from sync.check import validate_tree
from sync.errors import SyncError

from image.debian import boot, ext4, rootfs
from image.debian.rootfs import run, tool
from image.errors import BadInput, BuildError
from image.tree import Tree

REPO = Path(config_model.__file__).resolve().parents[2]
BUILD_DEB = REPO / "packaging" / "build_deb.py"
# .debs of this many commits stay in the cache (the newest by time): one is built per commit, about 20 MB each, and
# a test run or an image build of an older checkout may still be using its own
KEEP_DEBS = 4


def carpguard_deb(log=print) -> Path:
    """The .deb of the last commit (packaging/build_deb.py), cached per commit in <cache>/deb/<commit>/."""
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"{REPO}: not a git checkout; pass the .deb to use (--deb)")
    out = rootfs.cache_root() / "deb" / r.stdout.strip()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".build.lock", "w") as held:  # two image builds at once build one .deb, not two into one dir
        fcntl.flock(held, fcntl.LOCK_EX)
        deb = _cached_deb(out, r.stdout.strip(), log)
        prune_debs(out.parent, out.name)
        return deb


def prune_debs(cache: Path, current: str, keep: int = KEEP_DEBS) -> list[str]:
    """Remove the cached .debs of all but the `keep` newest commits (`current`'s always stays); the names removed."""
    others = sorted((d for d in cache.iterdir() if d.is_dir() and d.name != current),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    gone = [d.name for d in others[max(keep - 1, 0):]]
    for name in gone:
        shutil.rmtree(cache / name, ignore_errors=True)
    return gone


def _cached_deb(out: Path, commit: str, log) -> Path:
    debs = sorted(out.glob("carpguard_*_amd64.deb"))
    if debs:
        return debs[0]
    log(f"building the carpguard .deb of commit {commit[:12]} (packaging/build_deb.py)")
    run([sys.executable, str(BUILD_DEB), "--out", str(out), "--commit", commit], "packaging/build_deb.py", timeout=1800,
        umask=0o022)
    debs = sorted(out.glob("carpguard_*_amd64.deb"))
    if not debs:
        raise BuildError(f"packaging/build_deb.py made no .deb in {out}")
    return debs[0]


# in the tree, in a private mount namespace: /dev and /proc for the maintainer scripts, gone with the process.
# Off at boot (14 s and 33 s of a TCG guest's boot, docs/image.md): ifupdown's networking.service (systemd-networkd
# configures the NICs; systemd itself raises lo; it also held network-online.target) and e2scrub_reap.service (it
# removes e2scrub's LVM snapshots; the image has no LVM).
IN_CHROOT = """set -eu
umask 022
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key   # sshd -t in postinst needs a key; replaced per node
dpkg -i /tmp/carpguard.deb
systemctl enable systemd-networkd.service
systemctl disable networking.service e2scrub_reap.service
rm -f /tmp/carpguard.deb /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub
rm -rf /run/sshd
"""


def install_deb(root: Path, deb: Path, epoch: int) -> None:
    (root / "tmp/carpguard.deb").write_bytes(deb.read_bytes())
    script = (f"mount --rbind /dev {shlex.quote(str(root))}/dev && mount -t proc proc {shlex.quote(str(root))}/proc && "
              f"chroot {shlex.quote(str(root))} /bin/sh -c {shlex.quote(IN_CHROOT)}")
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    run([tool("unshare", "util-linux"), "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
        f"installing {deb.name} in the image", env=env, timeout=1800)


def normalise(root: Path, epoch: int) -> None:
    """What depends on when the build ran: logs and caches go, every password change date is the epoch's day, and
    root's password is locked (`!*`: no password login at all; SSH is by key)."""
    for rel in rootfs.UNSTABLE:
        (root / rel).unlink(missing_ok=True)
    day = str(epoch // 86400)
    shadow = root / "etc/shadow"
    lines = []
    for line in shadow.read_text().splitlines():
        f = line.split(":")
        if len(f) >= 3:
            f[2] = day
            if f[0] == "root":
                f[1] = "!*"
        lines.append(":".join(f))
    shadow.write_text("\n".join(lines) + "\n")
    (root / "etc/machine-id").write_text("uninitialized\n")


def common(work: Path, release: str, epoch: int, deb: Path, log=print) -> tuple[Path, dict[str, str]]:
    """The tree every node starts from; returns it and the exact package versions (dpkg's database, in the tree)."""
    tar, _ = rootfs.base_tar(release, epoch, log)
    root = work / "common"
    root.mkdir()
    run(["tar", "-xpf", str(tar), "-C", str(root), "--numeric-owner"], "unpacking the base tree")
    install_deb(root, deb, epoch)
    normalise(root, epoch)
    boot.install_modules(root)
    return root, rootfs.package_versions(root)


def ids(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The tree's own users and groups (the .deb's postinst made the sync user there), by name."""
    def table(path: Path) -> dict[str, int]:
        return {f[0]: int(f[2]) for f in (l.split(":") for l in path.read_text().splitlines()) if len(f) > 2}
    return table(root / "etc/passwd"), table(root / "etc/group")


def apply(t: Tree, root: Path) -> None:
    """Write the overlay over the tree: files and links replace what is there; an overlay directory gets its mode and
    owner, an implicit parent that exists keeps the package's."""
    users, groups = ids(root)
    for e in t:
        if e.path == "/":
            continue
        dst = root / e.path.lstrip("/")
        try:
            uid, gid = users[e.uname], groups["root" if e.gname == "wheel" else e.gname]  # FreeBSD's wheel: root
        except KeyError as err:
            raise BuildError(f"{e.path}: owner {e.uname}:{e.gname} does not exist in the image ({err})") from None
        if e.kind == "dir":
            if dst.is_dir() and not dst.is_symlink() and e.source != "overlay":
                continue
            dst.mkdir(exist_ok=True)
        else:
            if dst.is_symlink() or dst.exists():
                if dst.is_dir() and not dst.is_symlink():
                    raise BuildError(f"{e.path}: the overlay's {e.kind} would replace a directory of the image")
                dst.unlink()
            if e.kind == "link":
                os.symlink(e.target, dst)
                os.lchown(dst, uid, gid)
                continue
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(e.data)
        os.chown(dst, uid, gid)
        os.chmod(dst, e.mode)



def bake_index(root: Path, release: str, epoch: int) -> Path:
    """Compile the release's list index once its files have the mtimes the image keeps. clamp_times is the
    normalisation make_ext4 runs over the whole tree afterwards (min(mtime, epoch): a second pass moves nothing), so
    the mtimes the index's fingerprint records are the ones the booted node sees: the proxy finds the index current
    with one stat per list file and never has to write into its release, which its unit mounts read-only. The
    release is checked and compiled as a node checks a release a sync brings (sync.check.validate_tree)."""
    rel = root / release.lstrip("/")
    ext4.clamp_times(rel, epoch)
    try:
        validate_tree(rel, confine=True)
    except SyncError as e:
        raise BadInput(f"the image's release does not check: {e}") from None
    index = rel / "compiled" / "filter.idx"
    if not index.is_file():  # APPLIANCE_SYNC_NO_COMPILE=1 (a test knob) skips the compiler
        raise BuildError(f"{index}: the list index was not compiled (is APPLIANCE_SYNC_NO_COMPILE set?)")
    os.chmod(index.parent, 0o755)  # as the rest of the release (the build's umask is 077)
    for f in index.parent.iterdir():
        os.chmod(f, 0o644)
    return index
