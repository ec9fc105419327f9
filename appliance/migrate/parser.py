"""The SquidGuard configuration language read into an SgConfig, with SquidGuard's own refusals as file:line errors."""
from __future__ import annotations

import re
from typing import Callable, Optional

from appliance.migrate import sgtime
from appliance.migrate.lexer import SquidGuardError, Token, read_config, tokenize
from appliance.migrate.sgmodel import (IN_ADDR, TERMINATORS, Acl, Branch, Dest, ListRef, PassItem, SgConfig, Source,
                                       TimeDef, TimeRef)
from appliance.migrate.sgnets import parse_ip_words

# SquidGuard's lexer reserves these words everywhere: one of them ends an open list of words (pass, user, ip, ...)
KEYWORDS = {
    "dest", "destination", "src", "source", "rew", "rewrite", "time", "acl", "dbhome", "logdir", "ldapcachetime",
    "ldapprotover", "ldapbinddn", "ldapbindpass", "mysqlusername", "mysqlpassword", "mysqldb", "domainlist", "urllist",
    "expressionlist", "iplist", "user", "userlist", "userquery", "ldapusersearch", "execuserlist", "userquota",
    "domain", "pass", "redirect", "minutely", "hourly", "daily", "weekly", "continuous", "continue", "sporadic",
    "date", "anonymous", "verbose", "log", "logfile", "within", "outside", "else", "ip",
}
TOP_ONLY = {"dest", "destination", "src", "source", "rew", "time", "acl", "dbhome", "logdir"}
LIST_KINDS = {"domainlist": "domains", "urllist": "urls", "expressionlist": "expressions"}
SETTINGS = {"logdir", "ldapcachetime", "ldapprotover", "ldapbindpass", "mysqlusername", "mysqlpassword", "mysqldb"}
NAME_RE = re.compile(r"^[A-Za-z0-9/][A-Za-z0-9/_.:%+?=&-]*$")


class Parser:
    def __init__(self, tokens: list[Token], cfg: SgConfig):
        self.toks, self.pos, self.cfg = tokens, 0, cfg

    # ---------------------------------------------------------------- tokens

    def error(self, tok: Optional[Token], msg: str) -> SquidGuardError:
        line = tok.line if tok else (self.toks[-1].line if self.toks else 1)
        return SquidGuardError(f"{self.cfg.path}:{line}: {msg}")

    def peek(self) -> Optional[Token]:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self, what: str = "a word") -> Token:
        tok = self.peek()
        if tok is None:
            raise self.error(None, f"unexpected end of file, expected {what} (unbalanced braces?)")
        self.pos += 1
        return tok

    def word(self, what: str) -> Token:
        tok = self.take(what)
        if tok.text in "{}" or tok.text.lower() in KEYWORDS:
            raise self.error(tok, f"expected {what}, got {tok.text!r}")
        return tok

    def expect(self, text: str) -> Token:
        tok = self.take(repr(text))
        if tok.text != text:
            raise self.error(tok, f"expected {text!r}, got {tok.text!r}")
        return tok

    def words(self) -> list[Token]:
        """An open list of words: up to the next reserved word or brace."""
        out = []
        while (tok := self.peek()) is not None and tok.text not in "{}" and tok.text.lower() not in KEYWORDS:
            out.append(self.take())
        return out

    def rest_of_line(self, line: int) -> list[Token]:
        out = []
        while (tok := self.peek()) is not None and tok.line == line:
            out.append(self.take())
        return out

    def block(self, what: str, content: Callable[[Token], None]) -> None:
        """`{ content... }`: content is called with each statement's first token."""
        self.expect("{")
        while True:
            tok = self.take(f"'}}' closing the {what}")
            if tok.text == "}":
                return
            if tok.text == "{":
                raise self.error(tok, f"unexpected '{{' in the {what}")
            if tok.text.lower() in TOP_ONLY:
                raise self.error(tok, f"{tok.text!r} inside the {what}: is its closing '}}' missing?")
            content(tok)

    # ---------------------------------------------------------------- top level

    def parse(self) -> SgConfig:
        while (tok := self.peek()) is not None:
            self.pos += 1
            self.statement(tok)
        if self.cfg.default is None:
            raise SquidGuardError(f"{self.cfg.path}: no default acl (SquidGuard refuses to start without one)")
        self.check_references()
        return self.cfg

    def statement(self, tok: Token) -> None:
        kw = tok.text.lower()
        if kw in "{}":
            raise self.error(tok, f"unbalanced {tok.text!r}: no block is open here")
        if kw in ("dest", "destination"):
            self.dest(tok)
        elif kw in ("src", "source"):
            self.source(tok)
        elif kw == "time":
            self.time(tok)
        elif kw == "acl":
            self.block("acl block", self.acl)
        elif kw in ("rew", "rewrite"):
            name = self.word("a rewrite name")
            self.block("rewrite block", lambda t: None if t.text.startswith("s@") else self.rewrite_content(t))
            self.cfg.note(tok.line, f"rewrite {name.text}", "URL rewriting is not carried: requests go out unchanged "
                          "(for SafeSearch, block the unsafe search hosts or use the search engine's own setting)", False)
        elif kw == "dbhome":
            self.cfg.dbhome, self.cfg.dbhome_line = self.word("a directory").text, tok.line
        elif kw in SETTINGS:
            self.word("a value")
            self.cfg.note(tok.line, kw, "a SquidGuard setting with no counterpart (logs: proxy.access_log)", False)
        elif kw == "ldapbinddn":
            self.rest_of_line(tok.line)
            self.cfg.note(tok.line, kw, "LDAP is not used: sources by user are not carried", False)
        else:
            raise self.error(tok, f"unknown keyword {tok.text!r} (expected dest, src, time, rew, acl, dbhome, logdir)")

    def name(self, what: str, taken: set[str]) -> Token:
        tok = self.word(f"a {what} name")
        if not NAME_RE.match(tok.text):
            raise self.error(tok, f"{tok.text!r} is not a valid {what} name")
        if tok.text in taken:
            raise self.error(tok, f"{what} {tok.text} is defined twice")
        return tok

    def log(self, tok: Token) -> None:
        while (nxt := self.peek()) is not None and nxt.text.lower() in ("anonymous", "verbose"):
            self.take()
        self.word("a log file")
        self.cfg.note(tok.line, "log", "per-rule log files are not carried: every decision goes to proxy.access_log", False)

    def time_ref(self, tok: Token) -> TimeRef:
        return TimeRef(tok.text.lower(), self.word("a time name").text, tok.line)

    # ---------------------------------------------------------------- dest

    def dest(self, tok: Token) -> None:
        name = self.name("destination", set(self.cfg.dests))
        d = Dest(name.text, tok.line)
        self.cfg.dests[d.name] = d

        def content(t: Token) -> None:
            kw = t.text.lower()
            if kw in LIST_KINDS:
                arg = self.word("a list file")
                if arg.text == "-":
                    self.cfg.note(t.line, f"{kw} -", "an explicitly empty list: nothing to carry", False)
                else:
                    d.lists.append(ListRef(LIST_KINDS[kw], arg.text, t.line))
            elif kw in ("redirect", "rewrite"):
                self.word("a target")
                d.has_redirect = True
                self.cfg.note(t.line, f"dest {d.name} {kw}", "the block page replaces redirect targets", False)
            elif kw in ("within", "outside"):
                d.time = self.time_ref(t)
            elif kw in ("log", "logfile"):
                self.log(t)
            else:
                raise self.error(t, f"unknown keyword {t.text!r} in dest {d.name}")
        self.block(f"dest {d.name} block", content)

    # ---------------------------------------------------------------- src

    def source(self, tok: Token) -> None:
        name = self.name("source", {s.name for s in self.cfg.sources})
        s = Source(name.text, tok.line)
        self.cfg.sources.append(s)
        self.block(f"src {s.name} block", lambda t: self.source_content(s, t))

    def source_content(self, s: Source, t: Token) -> None:
        kw = t.text.lower()
        if kw == "ip":
            s.has_ip = True
            try:
                s.nets += parse_ip_words([w.text for w in self.words()])
            except ValueError as e:
                raise self.error(t, f"src {s.name}: {e}") from None
        elif kw == "iplist":
            s.has_ip = True
            s.iplists.append((t.line, self.word("an ip list file").text))
        elif kw in ("user", "domain"):
            self.words()
            s.other.append((t.line, kw))
        elif kw in ("userlist", "userquery", "ldapusersearch"):
            self.word("a value")
            s.other.append((t.line, kw))
        elif kw == "execuserlist":
            self.rest_of_line(t.line)
            s.other.append((t.line, kw))
        elif kw == "userquota":
            self.take("a number"), self.take("a number"), self.take("hourly, daily, weekly or seconds")
            self.cfg.note(t.line, "userquota", "time quotas are not carried")
        elif kw in ("within", "outside"):
            s.time = self.time_ref(t)
        elif kw in ("log", "logfile"):
            self.log(t)
        elif kw == "continue":
            s.cont = t.line
        else:
            raise self.error(t, f"unknown keyword {t.text!r} in src {s.name}")

    # ---------------------------------------------------------------- time

    def time(self, tok: Token) -> None:
        name = self.name("time", set(self.cfg.times))
        td = TimeDef(name.text, tok.line)
        self.cfg.times[td.name] = td

        def content(t: Token) -> None:
            kw = t.text.lower()
            args = self.words()
            if kw == "weekly":
                try:
                    el = sgtime.parse_weekly([a.text for a in args], t.line)
                except ValueError as e:
                    raise self.error(t, f"time {td.name}: {e}") from None
                td.weekly.append(el)
                for a, b in el.spans:
                    if a >= b:
                        self.cfg.note(t.line, f"time {td.name} {a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}",
                                      "SquidGuard never matches a range that ends before it starts (no wrap past "
                                      "midnight): left out, as it never applied", False)
            elif kw == "date":
                if not args:
                    raise self.error(t, f"time {td.name}: date without a date")
                td.dates.append((t.line, " ".join(a.text for a in args)))
            else:
                raise self.error(t, f"unknown keyword {t.text!r} in time {td.name} (expected weekly or date)")
        self.block(f"time {td.name} block", content)

    def rewrite_content(self, t: Token) -> None:
        kw = t.text.lower()
        if kw in ("within", "outside"):
            self.word("a time name")
        elif kw in ("log", "logfile"):
            self.log(t)
        else:
            raise self.error(t, f"unknown keyword {t.text!r} in a rewrite block (expected s@from@to@)")

    # ---------------------------------------------------------------- acl

    def acl(self, tok: Token) -> None:
        if tok.text.lower() in KEYWORDS:
            raise self.error(tok, f"expected a source name or default in the acl block, got {tok.text!r}")
        time = None
        nxt = self.peek()
        if nxt is not None and nxt.text.lower() in ("within", "outside"):
            time = self.time_ref(self.take())
        acl = Acl(tok.text, tok.line, time, self.branch(tok.text))
        nxt = self.peek()
        if nxt is not None and nxt.text.lower() == "else":
            self.take()
            acl.orelse = self.branch(f"{tok.text} else")
        if acl.name == "default":
            if self.cfg.default is not None:
                raise self.error(tok, "a second default acl")
            self.cfg.default = acl
        else:
            self.cfg.acls.append(acl)

    def branch(self, name: str) -> Branch:
        br = Branch(self.peek().line if self.peek() else 0)

        def content(t: Token) -> None:
            kw = t.text.lower()
            if kw == "pass":
                br.passes = (br.passes or []) + self.pass_items(t)
            elif kw in ("redirect", "rewrite"):
                arg = self.word("a target")
                if kw == "redirect":
                    self.cfg.note(t.line, f"acl {name} redirect", "the block page replaces redirect targets", False)
                elif arg.text != "none":
                    self.cfg.note(t.line, f"acl {name} rewrite {arg.text}", "URL rewriting is not carried: requests "
                                  "go out unchanged", False)
            elif kw in ("log", "logfile"):
                self.log(t)
            else:
                raise self.error(t, f"unknown keyword {t.text!r} in acl {name} (expected pass, redirect, rewrite, log)")
        self.block(f"acl {name}", content)
        return br

    def pass_items(self, t: Token) -> list[PassItem]:
        items, negate = [], False
        for w in self.words():
            for part in filter(None, re.split(r"(!)|,", w.text)):
                if part == "!":
                    negate = True
                    continue
                items.append(PassItem(part, not negate, w.line))
                negate = False
        if negate:
            raise self.error(t, "'!' without a destination name")
        return items

    # ---------------------------------------------------------------- references

    def check_references(self) -> None:
        cfg = self.cfg
        refs = [(d.time, f"dest {d.name}") for d in cfg.dests.values()] + [(s.time, f"src {s.name}") for s in cfg.sources]
        for acl in [*cfg.acls, cfg.default]:
            refs.append((acl.time, f"acl {acl.name}"))
            if acl.name != "default" and cfg.source(acl.name) is None:
                raise SquidGuardError(f"{cfg.path}:{acl.line}: acl {acl.name}: no src {acl.name} is defined")
            for br in (acl.branch, acl.orelse):
                for item in (br.passes or []) if br else []:
                    if item.name not in cfg.dests and item.name not in TERMINATORS and item.name != IN_ADDR:
                        raise SquidGuardError(f"{cfg.path}:{item.line}: acl {acl.name}: pass names {item.name}, "
                                              "which is no dest (nor all, any, none, in-addr)")
        for ref, owner in refs:
            if ref is not None and ref.name not in cfg.times:
                raise SquidGuardError(f"{cfg.path}:{ref.line}: {owner}: no time {ref.name} is defined")


def parse_file(path: str) -> SgConfig:
    """Read and check a squidGuard.conf; SquidGuardError (file:line) when SquidGuard would refuse it."""
    text = read_config(path)
    return Parser(tokenize(text, path), SgConfig(path)).parse()
