"""Bad input to every `appliance` command: exit 2 (or the documented code), one message naming the field/file, no traceback, nothing written."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.env import APPLIANCE, EXAMPLES

LAB = f"nl{uuid.uuid4().hex[:8]}"  # a lab name nobody else uses on this machine (names are at most 10 characters)
ZERO_HASH = "0" * 64


def _edit(old: str, new: str):
    def setup(t: Path) -> None:
        p = t / "etc" / "appliance.yaml"
        s = p.read_text()
        assert old in s, old
        p.write_text(s.replace(old, new))
    return setup


def _write(rel: str, data: str | bytes):
    def setup(t: Path) -> None:
        p = t / rel
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return setup


BAD_VHID = _edit("vhid: 1", "vhid: 300")
C = ["-c", "{cfg}"]
N = C + ["--node", "fw1"]
CLICK = "Invalid value for"  # click's usage error: names the option or argument

# the compiled list index: a derived cache in the config tree that commands may (re)build
INDEX = ["etc/compiled", "etc/compiled/.gitignore", "etc/compiled/filter.idx"]
# (id, argv, setup, expected exit, substrings of the message, files allowed to change, extra env)
CASES = [
    ("check-missing-config", ["-c", "{t}/nope.yaml", "check"], None, 2, ["nope.yaml: no such config file"], [], {}),
    ("check-config-is-dir", ["-c", "{t}/etc", "check"], None, 2, ["etc: cannot read", "Is a directory"], [], {}),
    ("check-env-config-missing", ["check"], None, 2, ["nope.yaml: no such config file"], [], {"APPLIANCE_CONFIG": "{t}/nope.yaml"}),
    ("check-yaml-syntax", C + ["check"], _edit("vhid: 1", "vhid: [1"), 2, ["appliance.yaml:6:", "YAML syntax error"], [], {}),
    ("check-unknown-key", C + ["check"], _edit("vhid: 1", "vhid: 1\n  vhidd: 2"), 2, ["appliance.yaml:6: cluster.vhidd: unknown key"], [], {}),
    ("check-vhid-range", C + ["check"], BAD_VHID, 2, ["appliance.yaml:5: cluster.vhid:", "255"], [], {}),
    ("check-empty-config", C + ["check"], _write("etc/appliance.yaml", ""), 2, ["appliance.yaml:1:", "mapping"], [], {}),
    ("check-not-utf8", C + ["check"], _write("etc/appliance.yaml", b"\xff\xfe\x00bad"), 2, ["appliance.yaml: cannot read", "utf-8"], [], {}),
    ("check-lists-missing", C + ["check", "--compile"], lambda t: shutil.rmtree(t / "etc" / "lists"), 2,
     ["appliance.yaml:23: filter.lists: directory", "does not exist"], [], {}),
    ("check-bad-list-line-skip", C + ["check", "--compile"], _write("etc/lists/adult/domains", "ok.example\nbad host!!\n"), 0,
     ["warning: bad list line skipped: lists/adult/domains:2:", "1 bad lines skipped"], INDEX, {}),
    ("check-bad-list-line-reject", C + ["check", "--compile"],
     lambda t: (_edit("lists: lists/", "lists: lists/\n  bad_lines: reject")(t), _write("etc/lists/adult/domains", "ok.example\nbad host!!\n")(t)),
     2, ["bad_lines is reject", "lists/adult/domains:2:"], [], {}),
    ("check-unknown-option", ["check", "--frob"], None, 2, ["No such option '--frob'"], [], {}),
    ("unknown-command", ["frobnicate"], None, 2, ["No such command 'frobnicate'"], [], {}),
    ("render-unknown-node", C + ["--node", "fw9", "render"], None, 2, ["--node: node: 'fw9' is not one of the nodes"], [], {}),
    ("render-no-node", C + ["render"], None, 2, ["cannot tell which node this is", "node.yaml"], [], {}),
    ("render-bad-node-yaml", C + ["render"], _write("etc/node.yaml", "node: [\n"), 2, ["node.yaml:2:", "YAML syntax error"], [], {}),
    ("config-reference-update-missing", ["config-reference", "--update", "{t}/NOPE.md"], None, 2, [CLICK + " '--update'", "NOPE.md"], [], {}),
    ("proxy-listen-no-colon", N + ["proxy", "--listen", "nope"], None, 2, ["--listen 'nope': expected HOST:PORT"], INDEX, {}),
    ("proxy-listen-port-range", N + ["proxy", "--listen", "127.0.0.1:99999"], None, 2, ["--listen '127.0.0.1:99999'"], INDEX, {}),
    ("proxy-listen-bad-ip", N + ["proxy", "--listen", "1.2.3.4.5:8080"], None, 2, ["'1.2.3.4.5' is not an IPv4 address"], INDEX, {}),
    ("proxy-listen-no-port", N + ["proxy", "--listen", "127.0.0.1:"], None, 2, ["--listen '127.0.0.1:'"], INDEX, {}),
    ("proxy-bad-config", N + ["proxy", "--listen", "127.0.0.1:0"], BAD_VHID, 2, ["appliance.yaml:5: cluster.vhid"], [], {}),
    ("reload-bad-config", N + ["reload"], BAD_VHID, 2, ["appliance.yaml:5: cluster.vhid", "keeps its current rules"], [], {}),
    ("reload-no-proxy", N + ["reload"], None, 1, ["the proxy is not running", "proxy.pid"], INDEX, {}),
    ("explain-at-words", N + ["explain", "http://a.example/", "--at", "tomorrow"], None, 2, ["--at 'tomorrow'", "YYYY-MM-DD HH:MM"], [], {}),
    ("explain-at-month-13", N + ["explain", "http://a.example/", "--at", "2026-13-01 10:00"], None, 2, ["--at '2026-13-01 10:00'"], [], {}),
    ("explain-client-bad", N + ["explain", "http://a.example/", "--client", "999.1.1.1"], None, 2, ["--client '999.1.1.1': not an IPv4"], [], {}),
    ("explain-client-v6", N + ["explain", "http://a.example/", "--client", "::1"], None, 2, ["--client '::1': not an IPv4"], [], {}),
    ("explain-url-empty", N + ["explain", ""], None, 2, ["'': not a URL or host name"], [], {}),
    ("explain-url-scheme-only", N + ["explain", "http://"], None, 2, ["'http://': not a URL or host name"], [], {}),
    ("explain-url-spaces", N + ["explain", "http://exa mple/ x"], None, 2, ["not a URL or host name"], [], {}),
    ("explain-url-port-range", N + ["explain", "a.example:99999"], None, 2, ["port '99999' is not 1-65535"], [], {}),
    ("explain-url-port-zero", N + ["explain", "http://a.example:0/x"], None, 2, ["port '0' is not 1-65535"], [], {}),
    ("role-bad-role", N + ["role", "primary"], None, 2, [CLICK + " 'master|backup'", "'primary'"], [], {}),
    ("role-vhid-not-int", N + ["role", "backup", "--vhid", "abc"], None, 2, [CLICK + " '--vhid'"], [], {}),
    ("role-vhid-unknown", N + ["role", "backup", "--vhid", "99"], None, 2, ["--vhid 99 is not a vhid of this cluster"], [], {}),
    ("role-bad-iface", N + ["role", "backup", "--iface", "bad if!"], None, 2, ["--iface 'bad if!': not an interface name"], [], {}),
    ("role-seq-not-int", N + ["role", "backup", "--seq", "x"], None, 2, [CLICK + " '--seq'"], [], {}),
    ("role-unknown-node", C + ["--node", "fw9", "role", "backup"], None, 2, ["'fw9' is not one of the nodes"], [], {}),
    ("carp-bad-engine", N + ["carp", "--engine", "bogus"], None, 2, [CLICK + " '--engine'"], [], {}),
    ("carp-deadratio-0", N + ["carp", "--deadratio", "0"], None, 2, [CLICK + " '--deadratio'"], [], {}),
    ("carp-bad-check", N + ["carp", "--check", "nope"], None, 2, ["--check 'nope': expected HOST:PORT"], [], {}),
    ("carp-unknown-node", C + ["--node", "fw9", "carp"], None, 2, ["'fw9' is not one of the nodes"], [], {}),
    ("status-unknown-node", C + ["--node", "fw9", "status", "--no-probe"], None, 2, ["'fw9' is not one of the nodes"], [], {}),
    ("status-missing-config", ["-c", "{t}/nope.yaml", "--node", "fw1", "status"], None, 2, ["nope.yaml: no such config file"], [], {}),
    ("demote-unknown-node", C + ["--node", "fw9", "demote"], None, 2, ["'fw9' is not one of the nodes"], [], {}),
    ("demote-preempt-off", N + ["demote"], _edit("preempt: true", "preempt: false"), 2, ["refusing to demote", "cluster.preempt: false"], [], {}),
    ("promote-unknown-node", C + ["--node", "fw9", "promote"], None, 2, ["'fw9' is not one of the nodes"], [], {}),
    ("watchdog-check-no-colon", N + ["watchdog", "--check", "nope", "--once"], None, 2, ["--check 'nope': expected HOST:PORT"], [], {}),
    ("watchdog-check-port-0", N + ["watchdog", "--check", "127.0.0.1:0", "--once"], None, 2, ["--check '127.0.0.1:0'"], [], {}),
    ("watchdog-check-no-host", N + ["watchdog", "--check", ":8080", "--once"], None, 2, ["--check ':8080'"], [], {}),
    ("lab-up-bad-engine", C + ["lab", "up", "--engine", "bogus"], None, 2, [CLICK + " '--engine'"], [], {}),
    ("lab-up-deadratio-99", C + ["lab", "up", "--deadratio", "99"], None, 2, [CLICK + " '--deadratio'"], [], {}),
    ("lab-up-bad-config", C + ["lab", "up"], BAD_VHID, 2, ["appliance.yaml:5: cluster.vhid"], [], {}),
    ("lab-down-unknown", ["lab", "down", "--name", LAB], None, 2, [f"--name '{LAB}': no such lab", "nothing removed"], [], {}),
    ("lab-status-unknown", ["lab", "status", "--name", LAB], None, 2, [f"no lab named '{LAB}'"], [], {}),
    ("lab-exec-unknown-lab", ["lab", "exec", "--name", LAB, "fw9", "--", "true"], None, 2, [f"no lab named '{LAB}'"], [], {}),
    ("lab-exec-no-command", ["lab", "exec", "--name", LAB, "fw1"], None, 2, ["Missing argument 'ARGV...'"], [], {}),
    ("lab-failover-bad-kind", ["lab", "failover", "--kind", "bogus"], None, 2, [CLICK + " '--kind'"], [], {}),
    ("lab-failover-runs-0", ["lab", "failover", "--runs", "0"], None, 2, [CLICK + " '--runs'"], [], {}),
    ("sync-bwlimit-0", N + ["sync", "--bwlimit", "0"], None, 2, [CLICK + " '--bwlimit'"], [], {}),
    ("sync-bad-config", N + ["sync"], BAD_VHID, 2, ["appliance.yaml:5: cluster.vhid"], [], {}),
    ("sync-bad-config-json", N + ["sync", "--json"], BAD_VHID, 2, ['"ok": false', "appliance.yaml:5: cluster.vhid"], [], {}),
    ("sync-unknown-node", C + ["--node", "fw9", "sync"], None, 2, ["'fw9' is not one of the nodes"], [], {}),
    ("sync-receive-bad-generation", ["sync-receive", "abc", ZERO_HASH], None, 2, ["generation: 'abc' is not a generation number"], [], {}),
    ("sync-receive-bad-hash", ["sync-receive", "3", "xyz"], None, 2, ["hash: 'xyz' is not a SHA-256 tree hash"], [], {}),
    ("sync-receive-nothing-staged", ["sync-receive", "3", ZERO_HASH], None, 2, ["nothing staged in", "sync/staging"], ["state/run", "state/run/sync.lock"], {}),
    ("sync-serve-no-command", ["sync-serve"], None, 2, ["SSH_ORIGINAL_COMMAND is not set"], ["state/sync", "state/sync/sync.log"], {}),
    ("sync-serve-foreign-command", ["sync-serve"], None, 2, ["unknown sync command 'rm'"], ["state/sync", "state/sync/sync.log"],
     {"SSH_ORIGINAL_COMMAND": "rm -rf /"}),
    ("releases-rollback-word", ["releases", "--rollback", "abc"], None, 2, ["--rollback: 'abc' is not a generation number"], [], {}),
    ("releases-rollback-0", ["releases", "--rollback", "0"], None, 2, ["--rollback: '0' is not a generation number"], [], {}),
    ("releases-rollback-negative", ["releases", "--rollback=-1"], None, 2, ["--rollback: '-1' is not a generation number"], [], {}),
    ("releases-rollback-missing", ["releases", "--rollback", "99"], None, 2, ["--rollback 99: no such release"], ["state/run", "state/run/sync.lock"], {}),
    ("keys-init-for-unknown", N + ["keys", "init", "--for", "fw9"], None, 2, ["--for: 'fw9' is not one of the other nodes"], [], {}),
    ("keys-init-bad-elevate", N + ["keys", "init", "--elevate", "bogus"], None, 2, [CLICK + " '--elevate'"], [], {}),
    ("keys-init-bad-appliance-bin", N + ["keys", "init", "--appliance-bin", "bad bin;rm"], None, 2,
     ["--appliance-bin:", "must be one absolute path"], [], {}),  # fixed: the key pair was written before this error
    ("keys-known-hosts-bad-pair", N + ["keys", "known-hosts", "fw9=/x"], None, 2, ["'fw9=/x': expected NODE=FILE"], [], {}),
    ("keys-known-hosts-missing-file", N + ["keys", "known-hosts", "fw1={t}/nope.pub"], None, 2, ["nope.pub: cannot read the host key of fw1"], [], {}),
    ("keys-known-hosts-not-a-key", N + ["keys", "known-hosts", "fw1={cfg}"], None, 2, ["appliance.yaml: not an OpenSSH public key"], [], {}),
    ("keys-known-hosts-default-missing", N + ["keys", "known-hosts"], None, 2, ["ssh_host_ed25519_key.pub: cannot read the host key of fw1"], [], {}),
    ("cron-file-under-a-file", N + ["cron", "--install", "--file", "{cfg}/x"], None, 2, ["--file", "appliance.yaml/x: cannot write"], [], {}),
    ("cron-appliance-bin-shell", N + ["cron", "--appliance-bin", "bad bin;rm"], None, 2, ["--appliance-bin 'bad bin;rm': must be one absolute path"], [], {}),
    ("cron-bad-config", N + ["cron"], BAD_VHID, 2, ["appliance.yaml:5: cluster.vhid"], [], {}),
    ("image-only-unknown", C + ["image", "--only", "fw9", "--out", "{t}/dist"], None, 2, ["--only fw9: not one of the nodes"], [], {}),
    ("image-bad-ufs-version", C + ["image", "--ufs-version", "3", "--out", "{t}/dist"], None, 2, [CLICK + " '--ufs-version'"], [], {}),
    ("image-freebsd-dist-missing", C + ["image", "--freebsd-dist", "{t}/nodist", "--out", "{t}/dist"], None, 2, ["nodist: not a directory"], [], {}),
    ("image-out-is-a-file", C + ["image", "--out", "{cfg}"], None, 2, [CLICK + " '--out'", "is a file"], [], {}),
]


def _files(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv,setup,code,needles,may_change,env", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(tmp_path: Path, argv, setup, code, needles, may_change, env) -> None:
    # a clean clone's examples/: without the derived index and the keys that `make run` / `make image` leave there
    shutil.copytree(EXAMPLES, tmp_path / "etc", ignore=shutil.ignore_patterns("compiled", "keys"))
    (tmp_path / "state").mkdir()
    if setup:
        setup(tmp_path)
    fmt = {"t": tmp_path, "cfg": tmp_path / "etc" / "appliance.yaml"}
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "SSH_ORIGINAL_COMMAND"))}
    run_env.update({k: v.format(**fmt) for k, v in env.items()}, APPLIANCE_STATE_DIR=str(tmp_path / "state"))
    before = _files(tmp_path)
    r = subprocess.run([APPLIANCE, *(a.format(**fmt) for a in argv)], capture_output=True, text=True, env=run_env,
                       timeout=60, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode == code, out
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, out
    if code == 2 and "Usage:" not in r.stderr and '"ok": false' not in r.stdout:
        errors = [l for l in r.stderr.splitlines() if l.startswith("appliance: error: ")]
        assert errors, r.stderr  # our one-line form, not a bare message
    after = _files(tmp_path)
    changed = sorted(k for k in after.keys() | before.keys() if before.get(k) != after.get(k))
    assert changed == sorted(may_change), changed  # nothing half-applied
