"""Build-time checks on a rendered tree: rc.conf/sysctl.conf syntax, shellcheck, devd rules, secrets, templates."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from image.errors import CheckFailed, MissingTool
from image.render import is_private_key
from image.tree import Entry, Tree

RC_LINE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*="(?:[^"\\$`]|\\.)*"$')
SYSCTL_LINE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_%]+)+=[^\s=\"']+$")
RC_FILES = ("/etc/rc.conf", "/boot/loader.conf")
TEMPLATE_LEFTOVERS = ("{{", "}}", "{%", "%}", "{#")


def _lines(data: bytes):
    for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            yield i, line


def check_rc_conf(path: str, data: bytes) -> list[str]:
    """Only `name="value"` lines (sh -n would accept commands, unquoted values, typos)."""
    return [f"{path}:{i}: not a name=\"value\" line: {line.strip()[:80]}" for i, line in _lines(data) if not RC_LINE.match(line)]


def check_sysctl_conf(path: str, data: bytes) -> list[str]:
    return [f"{path}:{i}: not a name=value line: {line.strip()[:80]}" for i, line in _lines(data) if not SYSCTL_LINE.match(line)]


# ---------------------------------------------------------------- devd.conf(5)

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{};]|[A-Za-z0-9_.+-]+')
_STATEMENTS = {"options", "attach", "detach", "notify", "nomatch"}
_SUBSTATEMENTS = {"match", "action", "device-name", "media-type", "class", "subdevice", "directory", "pid-file", "set"}


def _tokens(text: str, path: str) -> list[tuple[str, int]]:
    out, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"{path}:{line}: cannot parse near {text[pos:pos + 20]!r}")
        tok = m.group(0)
        if not tok.isspace() and not tok.startswith("#"):
            out.append((tok, line))
        line += tok.count("\n")
        pos = m.end()
    return out


def parse_devd(path: str, data: bytes) -> list[dict]:
    """Parse devd rules into [{"kind", "priority", "matches": [(var, regex)], "actions": [cmd]}]; ValueError on bad syntax."""
    toks = _tokens(data.decode(), path)
    rules, i = [], 0

    def expect(t: str) -> None:
        nonlocal i
        if i >= len(toks) or toks[i][0] != t:
            where = toks[i][1] if i < len(toks) else (toks[-1][1] if toks else 1)
            got = toks[i][0] if i < len(toks) else "end of file"
            raise ValueError(f"{path}:{where}: expected {t!r}, got {got!r}")
        i += 1

    while i < len(toks):
        kind, line = toks[i]
        if kind not in _STATEMENTS:
            raise ValueError(f"{path}:{line}: unknown statement {kind!r}")
        i += 1
        rule = {"kind": kind, "line": line, "matches": [], "actions": []}
        if kind != "options":
            if i >= len(toks) or not toks[i][0].lstrip("-").isdigit():
                raise ValueError(f"{path}:{line}: {kind} needs a numeric priority")
            rule["priority"] = int(toks[i][0])
            i += 1
        expect("{")
        while i < len(toks) and toks[i][0] != "}":
            word, wline = toks[i]
            if word not in _SUBSTATEMENTS:
                raise ValueError(f"{path}:{wline}: unknown keyword {word!r} in {kind} block")
            i += 1
            args = []
            while i < len(toks) and toks[i][0] not in (";", "{", "}"):
                args.append(toks[i][0])
                i += 1
            expect(";")
            strings = [a[1:-1] for a in args if a.startswith('"')]
            if word == "match":
                if len(args) != 2 or len(strings) != 2:
                    raise ValueError(f'{path}:{wline}: match needs "variable" "regex"')
                try:
                    re.compile(strings[1])
                except re.error as e:
                    raise ValueError(f"{path}:{wline}: regex {strings[1]!r} does not compile: {e}") from None
                rule["matches"].append((strings[0], strings[1]))
            elif word == "action":
                if len(args) != 1 or len(strings) != 1 or not strings[0].strip():
                    raise ValueError(f'{path}:{wline}: action needs one "command"')
                rule["actions"].append(strings[0])
        expect("}")
        expect(";")
        rules.append(rule)
    return rules


def check_devd(path: str, data: bytes, tree: Tree, root: Path | None = None) -> list[str]:
    try:
        rules = parse_devd(path, data)
    except ValueError as e:
        return [str(e)]
    problems = []
    for r in rules:
        for cmd in r["actions"]:
            exe = cmd.split()[0]
            e = tree.get(exe)
            mode = e.mode if e is not None and e.kind == "file" else None
            if mode is None and root is not None and (root / exe.lstrip("/")).is_file():
                mode = os.stat(root / exe.lstrip("/")).st_mode & 0o7777
            if mode is None:
                problems.append(f"{path}:{r['line']}: action runs {exe}, which is not in the image")
            elif mode != 0o555:
                problems.append(f"{path}:{r['line']}: action runs {exe}, mode {mode:04o} (must be 0555)")
    return problems


# ---------------------------------------------------------------- sync access: doas.conf(5), sshd_config(5), authorized_keys

DOAS_OPTIONS = {"nopass", "nolog", "persist", "keepenv"}
DOAS_PASSED_ENV = {"SSH_ORIGINAL_COMMAND", "SSH_CLIENT"}  # all a sync-serve rule may carry through the reset env
_DOAS_TOKEN = re.compile(r'"[^"\n]*"|[{}]|[^\s{}"]+')


def parse_doas(path: str, data: bytes) -> list[dict]:
    """doas.conf rules: permit|deny [options] identity [as target] [cmd command [args ...]]; ValueError on bad syntax."""
    text = data.decode("utf-8", "replace")
    if text and not text.endswith("\n"):
        raise ValueError(f"{path}: the last line must end with a newline (doas reports a syntax error otherwise)")
    rules = []
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("\\"):
            raise ValueError(f"{path}:{i}: continued lines are not used here")
        toks = [t.strip('"') for t in _DOAS_TOKEN.findall(line)]
        rule = {"line": i, "action": toks[0], "options": [], "setenv": [], "identity": None, "target": None, "cmd": None, "args": None}
        if rule["action"] not in ("permit", "deny"):
            raise ValueError(f"{path}:{i}: a rule starts with permit or deny, not {toks[0]!r}")
        k = 1
        while k < len(toks) and toks[k] in DOAS_OPTIONS | {"setenv"}:
            if toks[k] == "setenv":
                if k + 1 >= len(toks) or toks[k + 1] != "{" or "}" not in toks[k + 1:]:
                    raise ValueError(f"{path}:{i}: setenv needs {{ VARIABLE ... }}")
                end = toks.index("}", k + 1)
                rule["setenv"] = toks[k + 2:end]
                k = end + 1
            else:
                rule["options"].append(toks[k])
                k += 1
        if k >= len(toks) or toks[k] in ("as", "cmd", "args"):
            raise ValueError(f"{path}:{i}: missing the identity (user or :group)")
        rule["identity"] = toks[k]
        k += 1
        if k < len(toks) and toks[k] == "as":
            if k + 1 >= len(toks):
                raise ValueError(f"{path}:{i}: `as` needs a target user")
            rule["target"], k = toks[k + 1], k + 2
        if k < len(toks) and toks[k] == "cmd":
            if k + 1 >= len(toks) or toks[k + 1] == "args":
                raise ValueError(f"{path}:{i}: `cmd` needs a command")
            rule["cmd"], k = toks[k + 1], k + 2
            if k < len(toks) and toks[k] == "args":
                rule["args"], k = toks[k + 1:], len(toks)
        if k != len(toks):
            raise ValueError(f"{path}:{i}: unexpected {toks[k]!r}")
        rules.append(rule)
    return rules


def check_doas(e: Entry) -> list[str]:
    """Only one-command rules as root (absolute cmd, exact args, no keepenv/persist), root-owned, not writable by others."""
    problems = []
    if e.uid != 0 or e.mode not in (0o600, 0o640) or e.gid != 0:
        problems.append(f"{e.path}: owner {e.uname}:{e.gname} mode {e.mode:04o} (must be root:wheel 0600 or 0640)")
    try:
        rules = parse_doas(e.path, e.data)
    except ValueError as err:
        return problems + [str(err)]
    if not rules:
        problems.append(f"{e.path}: no rule")
    for r in rules:
        if r["action"] != "permit":
            continue
        where = f"{e.path}:{r['line']}"
        if r["target"] != "root" or not r["cmd"] or r["args"] is None:
            problems.append(f"{where}: a permit rule must name `as root`, `cmd /absolute/path` and exact `args`")
        elif not r["cmd"].startswith("/"):
            problems.append(f"{where}: cmd {r['cmd']!r} is not an absolute path")
        if r["identity"].startswith(":") or r["identity"] == "root":
            problems.append(f"{where}: identity {r['identity']!r}: only the sync user gets a rule here")
        for bad in ("keepenv", "persist"):
            if bad in r["options"]:
                problems.append(f"{where}: option {bad} is not allowed (the environment must stay reset)")
        extra = [v for v in r["setenv"] if v not in DOAS_PASSED_ENV]
        if extra:
            problems.append(f"{where}: setenv passes {' '.join(extra)} (only {' '.join(sorted(DOAS_PASSED_ENV))})")
        if "SSH_ORIGINAL_COMMAND" not in r["setenv"]:
            problems.append(f"{where}: setenv must keep SSH_ORIGINAL_COMMAND (sync-serve refuses to run without it)")
    return problems


SSHD_KEYWORDS = {"port", "permitrootlogin", "subsystem", "match", "authenticationmethods", "pubkeyauthentication",
                 "passwordauthentication", "kbdinteractiveauthentication", "permittty", "allowtcpforwarding",
                 "allowstreamlocalforwarding", "allowagentforwarding", "x11forwarding", "permittunnel", "forcecommand",
                 "listenaddress", "allowusers", "usepam", "hostkey"}
SSHD_MATCH_ONLY_NOT = {"port", "subsystem", "listenaddress", "usepam", "hostkey"}  # not allowed inside a Match block
SYNC_USER_MUST = {"permittty": "no", "allowtcpforwarding": "no", "x11forwarding": "no", "allowagentforwarding": "no",
                  "passwordauthentication": "no", "kbdinteractiveauthentication": "no", "permittunnel": "no"}


def parse_sshd_config(path: str, data: bytes) -> tuple[dict, dict[str, dict], list[str]]:
    """(global settings, {Match criteria: settings}, problems); keywords lower-cased, first value wins as in sshd."""
    glob: dict = {}
    blocks: dict[str, dict] = {}
    cur, problems = glob, []
    for i, line in _lines(data):
        word, rest = (re.split(r"\s+", line.strip(), maxsplit=1) + [""])[:2]
        kw, value = word.lower(), rest.strip()
        if kw not in SSHD_KEYWORDS:
            problems.append(f"{path}:{i}: unknown or unexpected keyword {word!r}")
            continue
        if not value:
            problems.append(f"{path}:{i}: {word} needs a value")
            continue
        if kw == "match":
            cur = blocks.setdefault(value, {})
            continue
        if cur is not glob and kw in SSHD_MATCH_ONLY_NOT:
            problems.append(f"{path}:{i}: {word} is not allowed inside a Match block")
        cur.setdefault(kw, value)
    return glob, blocks, problems


_AUTH_COMMAND = re.compile(r'(?:^|,)command="((?:[^"\\]|\\.)*)"')


def check_sync_access(tree: Tree) -> list[str]:
    """The sync user's authorized_keys, sshd_config and doas.conf must agree: one forced command, allowed by one rule."""
    problems: list[str] = []
    sshd = tree.get("/etc/ssh/sshd_config")
    doas = tree.get("/usr/local/etc/doas.conf")
    auths = [e for e in tree if e.kind == "file" and re.fullmatch(r"/(home/[^/]+|root)/\.ssh/authorized_keys", e.path)]
    glob, blocks = {}, {}
    if sshd is not None:
        glob, blocks, p = parse_sshd_config(sshd.path, sshd.data)
        problems += p
    rules = []
    if doas is not None:
        problems += check_doas(doas)
        try:
            rules = [r for r in parse_doas(doas.path, doas.data) if r["action"] == "permit"]
        except ValueError:
            pass
    for a in auths:
        user = "root" if a.path.startswith("/root/") else a.path.split("/")[2]
        if a.uid != 0 or a.mode & 0o037 or (a.mode & 0o040 and a.gname != user):
            problems.append(f"{a.path}: owner {a.uname}:{a.gname} mode {a.mode:04o} (must be root-owned, readable only by "
                            f"root and the {user} group, so the sync user cannot change its own restrictions)")
        for i, line in _lines(a.data):
            opts = line.split(" ssh-", 1)[0]
            m = _AUTH_COMMAND.search(opts)
            if not m or "restrict" not in opts.split(",") or "from=" not in opts:
                problems.append(f"{a.path}:{i}: a sync key needs command=\"...\", from=\"...\" and restrict")
                continue
            command = m.group(1).split()
            if user == "root":
                if glob.get("permitrootlogin") != "forced-commands-only":
                    problems.append(f"{a.path}:{i}: root logs in for sync, so sshd_config needs PermitRootLogin forced-commands-only")
                continue
            if command[:2] != ["/usr/local/bin/doas", "-n"]:
                problems.append(f"{a.path}:{i}: the forced command {' '.join(command)!r} does not run through `doas -n` "
                                "(the sync user cannot write the state dir or signal the proxy itself)")
                continue
            if not any(r["identity"] == user and r["target"] == "root" and r["cmd"] == command[2] and r["args"] == command[3:]
                       for r in rules):
                problems.append(f"{a.path}:{i}: no doas.conf rule lets {user} run {' '.join(command[2:])!r} as root")
            block = blocks.get(f"User {user}")
            if block is None:
                problems.append(f"{sshd.path if sshd else '/etc/ssh/sshd_config'}: no `Match User {user}` block for the sync user")
                continue
            if block.get("forcecommand", "").split() != command:
                problems.append(f"/etc/ssh/sshd_config: Match User {user}: ForceCommand {block.get('forcecommand')!r} "
                                f"is not the key's forced command {' '.join(command)!r}")
            for kw, want in SYNC_USER_MUST.items():
                if block.get(kw, "").lower() != want:
                    problems.append(f"/etc/ssh/sshd_config: Match User {user}: needs {kw} {want}")
    if sshd is not None and glob.get("permitrootlogin", "no") not in ("no", "forced-commands-only", "prohibit-password"):
        problems.append(f"{sshd.path}: PermitRootLogin {glob['permitrootlogin']} (no, or forced-commands-only for sync.user root)")
    return problems


# ---------------------------------------------------------------- scripts, secrets, templates


def check_scripts(tree: Tree) -> list[str]:
    scripts = [e for e in tree if e.kind == "file" and e.data.startswith(b"#!/bin/sh") and not e.source.startswith("package:")]
    if not scripts:
        return []
    exe = shutil.which("shellcheck")
    if exe is None:
        raise MissingTool("shellcheck", "shellcheck", "to check the rc.d scripts")
    problems = []
    with tempfile.TemporaryDirectory(prefix="carpguard-sc-") as d:
        for n, e in enumerate(scripts):
            f = Path(d) / f"{n}-{Path(e.path).name}"
            f.write_bytes(e.data)
            r = subprocess.run([exe, "-s", "sh", "-f", "gcc", str(f)], capture_output=True, text=True)
            if r.returncode != 0:
                for line in (r.stdout + r.stderr).splitlines():
                    problems.append(f"{e.path}: shellcheck: {line.replace(str(f) + ':', '', 1)}")
    return problems


def check_secrets(tree: Tree, password: bytes) -> list[str]:
    problems = []
    for e in tree:
        if e.kind != "file":
            continue
        # the project's own source (package:) is not rendered from the config; a match there is a coincidence
        rendered = not e.source.startswith("package:")
        holds = e.secret or is_private_key(e.data) or (rendered and password and password in e.data)
        if holds and e.mode & 0o077:
            problems.append(f"{e.path}: holds a secret but has mode {e.mode:04o} (must be 0600 or stricter)")
    return problems


def check_templates(tree: Tree) -> list[str]:
    problems = []
    for e in tree:
        if e.kind == "file" and e.source.startswith("template:"):
            text = e.data.decode("utf-8", "replace")
            for i, line in enumerate(text.splitlines(), 1):
                if any(t in line for t in TEMPLATE_LEFTOVERS) or "Undefined" in line:
                    problems.append(f"{e.path}:{i}: unresolved template text: {line.strip()[:80]}")
    return problems


def run_all(tree: Tree, password: bytes) -> list[str]:
    """Every check; returns the problems (empty when the tree is good)."""
    problems: list[str] = []
    for e in tree:
        if e.kind != "file":
            continue
        if e.path in RC_FILES or e.path.startswith("/etc/rc.conf.d/"):
            problems += check_rc_conf(e.path, e.data)
        elif e.path == "/etc/sysctl.conf":
            problems += check_sysctl_conf(e.path, e.data)
        elif e.path.startswith("/usr/local/etc/devd/") and e.path.endswith(".conf"):
            problems += check_devd(e.path, e.data, tree)
    problems += check_sync_access(tree)
    problems += check_scripts(tree)
    problems += check_secrets(tree, password)
    problems += check_templates(tree)
    return problems


def enforce(tree: Tree, password: bytes) -> None:
    problems = run_all(tree, password)
    if problems:
        raise CheckFailed(problems)
