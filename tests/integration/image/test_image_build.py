"""`appliance image` end to end with real makefs: UFS read back with dissect.ffs, tar, mtree, reproducibility, errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from image import ufs as ufsmod
from tests.support.env import APPLIANCE, need_tool
from tests.support.image import attrs, run_image, ufs


@pytest.fixture
def built(example_tree: Path, tmp_path: Path):
    need_tool("makefs", "shellcheck", "ssh-keygen")
    out = tmp_path / "dist"
    r = run_image(example_tree, out)
    assert r.returncode == 0, r.stderr
    return example_tree, out, r


def test_outputs_and_ufs_contents(built):
    cfg_path, out, r = built
    for n in ("fw1", "fw2"):
        for suffix in (".mtree", ".tar", ".ufs"):
            assert (out / f"{n}{suffix}").is_file()
        assert (out / n / "overlay" / "etc" / "rc.conf").is_file()
    assert "generated" in r.stderr and "sync_ed25519" in r.stderr  # the first build says it made the keys
    fs = ufs(out / "fw2.ufs")
    assert fs.get("/etc/rc.conf").open().read().decode().count('hostname="fw2"') == 1
    assert attrs(fs, "/etc/rc.conf") == (0o644, 0, 0)
    assert attrs(fs, "/etc/rc.conf.d/netif") == (0o600, 0, 0)
    assert b"advskew 100 pass change-me" in fs.get("/etc/rc.conf.d/netif").open().read()
    assert attrs(fs, "/usr/local/etc/rc.d/appliance") == (0o555, 0, 0)
    assert attrs(fs, "/usr/local/bin/appliance") == (0o555, 0, 0)
    assert attrs(fs, "/etc/ssh/ssh_host_ed25519_key") == (0o600, 0, 0)
    host_key = (cfg_path.parent / "keys/hosts/fw2/ssh_host_ed25519_key").read_bytes()
    assert fs.get("/etc/ssh/ssh_host_ed25519_key").open().read() == host_key
    assert attrs(fs, "/home/appliance-sync") == (0o755, 0, 0)
    assert attrs(fs, "/home/appliance-sync/.ssh") == (0o750, 0, 1990)
    assert attrs(fs, "/home/appliance-sync/.ssh/authorized_keys") == (0o640, 0, 1990)
    assert attrs(fs, "/var/db/appliance/keys/sync_ed25519") == (0o600, 0, 0)  # fw2's own sync key, outside the release
    assert attrs(fs, "/var/db/appliance/keys") == (0o700, 0, 0)
    assert attrs(fs, "/var/db/appliance/releases/1/appliance.yaml") == (0o600, 0, 0)
    assert fs.get("/var/db/appliance/releases/1/appliance.yaml").open().read() == cfg_path.read_bytes()
    cur = fs.get("/var/db/appliance/current")
    assert cur.is_symlink() and cur.link == "releases/1"
    etc = fs.get("/usr/local/etc/appliance")
    assert etc.is_symlink() and etc.link == "/var/db/appliance/current"
    assert fs.get("/var/db/appliance/node.yaml").open().read() == b"node: fw2\n"
    with pytest.raises(Exception):
        fs.get("/var/db/appliance/releases/1/keys/hosts")


def test_tar_is_a_dist_set(built):
    _, out, _ = built
    with tarfile.open(out / "fw1.tar") as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert all(n.startswith("./") for n in names)
    assert names.index("./etc") < names.index("./etc/rc.conf")
    assert {m.mtime for m in members} == {1704067200}
    by = {m.name: m for m in members}
    assert by["./etc/rc.conf.d/netif"].mode == 0o600 and by["./etc/rc.conf.d/netif"].uname == "root"
    assert by["./etc/rc.conf.d/netif"].gname == "wheel" and by["./etc/rc.conf.d/netif"].uid == 0
    auth = by["./home/appliance-sync/.ssh/authorized_keys"]
    assert (auth.uid, auth.gid, auth.uname, auth.gname, auth.mode) == (0, 1990, "root", "appliance-sync", 0o640)
    assert by["./usr/local/etc/appliance"].issym()


def test_mtree_matches_overlay(built):
    import hashlib

    _, out, _ = built
    spec = (out / "fw1.mtree").read_text()
    assert "./etc/rc.conf.d/netif type=file uname=root gname=wheel uid=0 gid=0 mode=0600" in spec
    checked = 0
    for line in spec.splitlines():
        if line.startswith("#"):
            continue
        path, *kws = line.split()
        kw = dict(k.split("=", 1) for k in kws)
        on_disk = out / "fw1" / "overlay" / path
        if kw["type"] == "file":
            data = on_disk.read_bytes()
            assert hashlib.sha256(data).hexdigest() == kw["sha256digest"] and len(data) == int(kw["size"]), path
            assert oct(on_disk.stat().st_mode & 0o7777) == oct(int(kw["mode"], 8)), path
            checked += 1
        elif kw["type"] == "link":
            assert os.readlink(on_disk) == kw["link"]
    assert checked > 50


def test_two_builds_identical_bytes(example_tree: Path, tmp_path: Path):
    need_tool("makefs", "shellcheck", "ssh-keygen")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_image(example_tree, a).returncode == 0
    r = run_image(example_tree, b)
    assert r.returncode == 0 and "generated" not in r.stderr  # keys reused
    assert (a / "SHA256SUMS").read_text() == (b / "SHA256SUMS").read_text()
    assert len((a / "SHA256SUMS").read_text().splitlines()) == 7
    c = tmp_path / "c"
    assert run_image(example_tree, c, env={"SOURCE_DATE_EPOCH": "1700000000"}).returncode == 0
    assert (c / "fw1.ufs").read_bytes() != (a / "fw1.ufs").read_bytes()
    assert json.loads((c / "manifest.json").read_text())["epoch"] == 1700000000


def test_makefs_alone_differs_and_normalise_fixes_it(tmp_path: Path):
    need_tool("makefs")
    import subprocess
    import time

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "f").write_text("x\n")
    spec = tmp_path / "spec"
    spec.write_text("#mtree\n. type=dir mode=0755 uname=root gname=wheel time=1.0\n./etc type=dir mode=0755 uname=root gname=wheel time=1.0\n"
                    "./etc/f type=file mode=0644 uname=root gname=wheel time=1.0\n")
    db = ufsmod.userdb(tmp_path / "db", {})
    imgs = []
    for i in range(2):
        img = tmp_path / f"u{i}"
        subprocess.run([ufsmod.makefs_bin(), "-t", "ffs", "-o", "version=2", "-T", "1", "-F", str(spec), "-N", str(db), "-s", "8m", str(img), str(root)],
                       check=True, capture_output=True)
        imgs.append(img)
        time.sleep(0.05)
    raw = [p.read_bytes() for p in imgs]
    assert raw[0] != raw[1]  # heap pointers in the superblocks differ (ASLR)
    for p in imgs:
        rep = ufsmod.normalise(p, seed=1)
        assert rep["superblocks"] >= 2
    assert imgs[0].read_bytes() == imgs[1].read_bytes()
    assert ufs(imgs[0]).get("/etc/f").open().read() == b"x\n"


def test_superblock_offsets_match_dissect():
    from dissect.ffs.c_ffs import c_ffs

    def offsets(st):
        fs = st.fields.values() if isinstance(st.fields, dict) else st.fields
        return {f.name: f.offset for f in fs}

    fields = offsets(c_ffs.fs)
    for name, off in ufsmod.OFF.items():
        assert fields[f"fs_{name}"] == off, name
    assert fields["fs_ocsp"] == ufsmod.INCORE[0] and fields["fs_old_cpc"] == ufsmod.INCORE[1]
    assert offsets(c_ffs.ufs1_dinode)["di_gen"] == ufsmod.DI_GEN[1][1] and len(c_ffs.ufs1_dinode) == ufsmod.DI_GEN[1][0]
    assert offsets(c_ffs.ufs2_dinode)["di_gen"] == ufsmod.DI_GEN[2][1] and len(c_ffs.ufs2_dinode) == ufsmod.DI_GEN[2][0]


def test_ufs2_option(example_tree: Path, tmp_path: Path):
    need_tool("makefs", "shellcheck", "ssh-keygen")
    out = tmp_path / "d"
    r = run_image(example_tree, out, "--ufs-version", "2", "--only", "fw1")
    assert r.returncode == 0, r.stderr
    assert not (out / "fw2.ufs").exists()
    fs = ufs(out / "fw1.ufs")
    assert fs.sb.fs_magic == 0x19540119
    assert attrs(fs, "/etc/rc.conf.d/netif") == (0o600, 0, 0)


def test_bad_config_exits_2_and_writes_nothing(example_tree: Path, tmp_path: Path):
    example_tree.write_text(example_tree.read_text().replace("vhid: 1", "vhid: 300"))
    out = tmp_path / "dist"
    r = run_image(example_tree, out)
    assert r.returncode == 2
    assert "cluster.vhid" in r.stderr and "appliance.yaml:5" in r.stderr
    assert not out.exists()


def test_unknown_node_is_bad_input(example_tree: Path, tmp_path: Path):
    r = run_image(example_tree, tmp_path / "d", "--only", "fw9")
    assert r.returncode == 2 and "fw9" in r.stderr


def test_missing_makefs_is_a_clear_error(example_tree: Path, tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for t in ("ssh-keygen", "shellcheck"):
        if shutil.which(t):
            os.symlink(shutil.which(t), bindir / t)
    import subprocess
    import sys

    from tests.support.env import APPLIANCE

    r = subprocess.run([sys.executable, APPLIANCE, "image", "-c", str(example_tree), "--out", str(tmp_path / "d")],
                       capture_output=True, text=True, env={"PATH": str(bindir), "HOME": str(tmp_path)})
    assert r.returncode == 3, r.stderr
    assert "missing tool 'makefs'" in r.stderr and "apt-get install makefs" in r.stderr


def test_ufs_sync_access_doas_sshd_and_key_agree(built):
    """Read back from the UFS image: the doas rule, sshd's Match block and the key's forced command are one command."""
    from sync import keys
    from image import checks

    cfg_path, out, _ = built
    fs = ufs(out / "fw1.ufs")
    assert attrs(fs, "/usr/local/etc/doas.conf") == (0o640, 0, 0)
    doas = fs.get("/usr/local/etc/doas.conf").open().read()
    rules = [l for l in doas.decode().splitlines() if l and not l.startswith("#")]
    assert rules == ["permit nopass setenv { SSH_ORIGINAL_COMMAND SSH_CLIENT } appliance-sync as root "
                     "cmd /usr/local/bin/appliance args sync-serve"]
    # per-node keys: fw1 authorises fw2's own key only, from fw2's sync address, tagged appliance-sync@fw2 (the line
    # `appliance keys init` on fw2 prints for fw1), so `appliance keys revoke fw2` takes it away alone
    pub = (cfg_path.parent / "keys/hosts/fw2/sync_ed25519.pub").read_text().split()
    auth = fs.get("/home/appliance-sync/.ssh/authorized_keys").open().read().decode()
    assert auth == (f'command="/usr/local/bin/doas -n /usr/local/bin/appliance sync-serve",from="192.168.200.2",restrict '
                    f"{pub[0]} {pub[1]} appliance-sync@fw2\n")
    from appliance.core import loader
    from appliance.core.paths import Paths

    cfg = loader.load(cfg_path)
    assert auth == "".join(l + "\n" for l in keys.node_authorized_keys(cfg, "fw1", {"fw2": " ".join(pub[:2])}, elevate="doas"))
    # fw1's own private key where `appliance sync` on fw1 pushes with it (sync.keys.push_key: Paths.sync_key first)
    own = Paths(Path("/var/db/appliance")).sync_key
    assert keys.push_key(own, Path("/var/db/appliance/current")) == own
    assert attrs(fs, str(own)) == (0o600, 0, 0) and attrs(fs, str(own.parent)) == (0o700, 0, 0)
    assert fs.get(str(own)).open().read() == (cfg_path.parent / "keys/hosts/fw1/sync_ed25519").read_bytes()
    with pytest.raises(Exception):
        fs.get("/var/db/appliance/releases/1/keys/sync_ed25519")  # no shared key in the (synced) release
    # node B's private sync key is nowhere in node A's image (nor A's in B's): the 4th base64 line is the private part
    for a, b in (("fw1", "fw2"), ("fw2", "fw1")):
        secret = (cfg_path.parent / f"keys/hosts/{b}/sync_ed25519").read_bytes().split(b"\n")[4]
        for suffix in (".ufs", ".tar"):
            assert secret not in (out / f"{a}{suffix}").read_bytes(), (a, b, suffix)
        assert secret in (out / f"{b}.ufs").read_bytes()  # the needle is right: it is in b's own image
    sshd = fs.get("/etc/ssh/sshd_config").open().read()
    glob, blocks, problems = checks.parse_sshd_config("/etc/ssh/sshd_config", sshd)
    assert problems == [] and glob["permitrootlogin"] == "no"
    assert blocks["User appliance-sync"]["forcecommand"] == keys.serve_command(elevate="doas")
    assert b"\ndoas\n" in fs.get("/usr/local/share/carpguard/packages.txt").open().read()
    cron = fs.get("/usr/local/etc/cron.d/appliance").open().read().decode()
    assert "\troot\t/usr/local/bin/appliance -c /usr/local/etc/appliance/appliance.yaml sync " in cron
    # what that cron line resolves to on the image: the config through the symlinks, the node from the state dir
    assert fs.get("/usr/local/etc/appliance").link == "/var/db/appliance/current"
    assert fs.get("/var/db/appliance/current").link == "releases/1"
    assert fs.get("/var/db/appliance/releases/1/appliance.yaml").open().read() == cfg_path.read_bytes()
    with pytest.raises(Exception):
        fs.get("/var/db/appliance/releases/1/node.yaml")  # so config.node_name() falls back to <state>/node.yaml
    assert fs.get("/var/db/appliance/node.yaml").open().read() == b"node: fw1\n"
