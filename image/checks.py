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
from image.tree import Tree

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
    problems += check_scripts(tree)
    problems += check_secrets(tree, password)
    problems += check_templates(tree)
    return problems


def enforce(tree: Tree, password: bytes) -> None:
    problems = run_all(tree, password)
    if problems:
        raise CheckFailed(problems)
