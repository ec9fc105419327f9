"""SquidGuard's decision for (client, time) turned into our filter section: one policy per source region and time.

SquidGuard gives a client exactly one pass list: the first active `src` that lists its address picks its first
active acl (or `else`), else the default acl; the pass list is read left to right and the first dest that lists the
URL decides; `all`/`any` pass the rest, `none` blocks it, running off the end passes. Our engine instead runs every
policy that matches the client, then the global block list. So the policies written here never overlap: each
covers the addresses a source really gets (minus earlier sources), for the minutes of the week in which that same
pass list applies (times, `within`/`outside`/`else` and timed dests turned into sets of minutes), and the global
lists stay empty unless the default acl is the only rule. Then the one policy that applies decides, and "no list
hit" means allow, as running off a pass list or `all` does in SquidGuard."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from appliance.core.rules import CATEGORY_RE
from appliance.migrate import listplan, sgtime
from appliance.migrate.lexer import SquidGuardError, read_config
from appliance.migrate.sgmodel import IN_ADDR, TERMINATORS, Acl, Branch, PassItem, SgConfig, Source, TimeRef
from appliance.migrate.sgnets import EVERYTHING, Net, collapse, intersect, parse_iplist, subtract


@dataclass
class Result:
    filter: dict
    categories: dict[str, listplan.Category]
    generated: set[str]
    notes: list


@dataclass
class _Choice:
    """What SquidGuard does for some addresses in some minutes: the acl branch chosen and its active pass items."""
    label: str
    items: tuple[PassItem, ...]
    terminator: Optional[PassItem]  # all/any pass the rest, none blocks it; None: ran off the end (passes)
    nets: list[Net]
    order: tuple[int, int]  # (source, branch) in the file's order; the default last
    week: int = 0


@dataclass
class _Rules:
    """The acl branches of one source, each with the minutes it is active, in SquidGuard's order."""
    source: Source
    nets: list[Net]
    active: int
    branches: list[tuple[str, int, Branch]] = field(default_factory=list)


def _when(cfg: SgConfig, ref: Optional[TimeRef]) -> int:
    if ref is None:
        return sgtime.FULL
    week = sgtime.bits(cfg.times[ref.name])
    return week if ref.mode == "within" else sgtime.FULL & ~week


def _source_nets(cfg: SgConfig, s: Source, dbhome: Optional[str]) -> list[Net]:
    nets = list(s.nets)
    for line, name in s.iplists:
        f = listplan.resolve(cfg, dbhome, name)
        if not f.is_file():
            raise SquidGuardError(f"{cfg.path}:{line}: src {s.name}: iplist {name}: no such file {f}")
        try:
            nets += parse_iplist(read_config(str(f)), str(f))
        except ValueError as e:
            raise SquidGuardError(f"{cfg.path}:{line}: src {s.name}: iplist: {e}") from None
    return collapse(nets)


def _rules(cfg: SgConfig, dbhome: Optional[str]) -> list[_Rules]:
    """Every source that can match by address, with its acl branches; the others are noted and left out."""
    out = []
    for s in cfg.sources:
        if s.other:
            line, kw = s.other[0]
            cfg.note(line, f"src {s.name} {kw}", "sources by user, LDAP or client domain are not carried (there is "
                     "no user identity here): this src is left out, so its clients get the next src that lists their "
                     "address, or the default acl")
            continue
        if not s.has_ip:
            cfg.note(s.line, f"src {s.name}", "an empty src, inactive in SquidGuard too", False)
            continue
        if s.cont is not None:
            cfg.note(s.cont, f"src {s.name} continue", "`continue` (also check the next src after a pass) is not "
                     "carried: only this src's acl decides")
        r = _Rules(s, _source_nets(cfg, s, dbhome), _when(cfg, s.time))
        for acl in (a for a in cfg.acls if a.name == s.name):
            cond = _when(cfg, acl.time)
            r.branches.append((acl.name, cond, acl.branch))
            if acl.orelse is not None:
                # SquidGuard switches an else on only when its acl has a time; an else of an untimed acl never runs
                r.branches.append((f"{acl.name}-else", sgtime.FULL & ~cond if acl.time else 0, acl.orelse))
        out.append(r)
    for acl in cfg.acls:
        if cfg.source(acl.name) is not None and acl is not next(a for a in cfg.acls if a.name == acl.name):
            cfg.note(acl.line, f"acl {acl.name}", "a second acl for the same src: used only when the first is "
                     "inactive (carried so)", False)
    return out


def _default_checks(cfg: SgConfig) -> None:
    d = cfg.default
    if d.time is not None or d.orelse is not None:
        cfg.note(d.line, "acl default within/outside/else", "SquidGuard makes the else branch the default; here the "
                 "first default branch applies at all times")
    if d.branch.passes is None:
        cfg.note(d.line, "acl default", "the default acl has no pass: SquidGuard blocks everything it handles; here "
                 "that is the generated sg-none category (whole URLs only)")
    for acl in [*cfg.acls, d]:
        for br in (acl.branch, acl.orelse):
            passes = (br.passes or []) if br else []
            cut = next((i for i, it in enumerate(passes) if it.name in TERMINATORS), len(passes))
            for it in passes[cut + 1:]:
                cfg.note(it.line, f"acl {acl.name} pass ... {passes[cut].name} {it.name}", "after the terminator: "
                         "never reached in SquidGuard either, left out", False)
    for td in cfg.times.values():
        for line, text in td.dates:
            cfg.note(line, f"time {td.name} date {text}", "date entries are not carried (our schedules are weekly): "
                     f"time {td.name} is active only by its weekly entries")


def _atoms(conds: list[int]) -> list[int]:
    """The coarsest split of the week in which every condition is constant."""
    atoms = [sgtime.FULL]
    for c in {c for c in conds if c not in (0, sgtime.FULL)}:
        atoms = [part for a in atoms for part in (a & c, a & ~c) if part]
    return atoms


def _effective(cfg: SgConfig, br: Branch, atom: int) -> tuple[tuple[PassItem, ...], Optional[PassItem]]:
    passes = br.passes if br.passes is not None else cfg.default.branch.passes
    if passes is None:
        return (), PassItem("none", False, cfg.default.line)  # no pass anywhere: SquidGuard blocks
    items: list[PassItem] = []
    for it in passes:
        if it.name in TERMINATORS:
            return tuple(items), it
        dest = cfg.dests.get(it.name)
        if dest is not None and not _when(cfg, dest.time) & atom:
            continue  # a timed dest outside its time is skipped
        if all(x.name != it.name for x in items):
            items.append(it)
    return tuple(items), None


def _choices(cfg: SgConfig, rules: list[_Rules]) -> list[_Choice]:
    conds = [r.active for r in rules] + [c for r in rules for _, c, _ in r.branches]
    conds += [_when(cfg, d.time) for d in cfg.dests.values()]
    found: dict[tuple, _Choice] = {}
    for atom in _atoms(conds):
        taken: list[Net] = []
        for i, r in enumerate(rules):
            if not r.active & atom:
                continue
            nets = subtract(r.nets, taken)
            taken += r.nets
            j = next((j for j, (_, c, _) in enumerate(r.branches) if c & atom), len(r.branches))
            label, _, br = r.branches[j] if j < len(r.branches) else (f"{r.source.name}-default", 0, cfg.default.branch)
            _add(found, cfg, (label, br, (i, j)), nets, atom)
        _add(found, cfg, ("default", cfg.default.branch, (len(rules), 0)), subtract([EVERYTHING], taken), atom)
    return sorted(found.values(), key=lambda ch: ch.order)


def _add(found: dict, cfg: SgConfig, what: tuple[str, Branch, tuple[int, int]], nets: list[Net], atom: int) -> None:
    label, br, order = what
    if not nets:
        return
    items, term = _effective(cfg, br, atom)
    key = (label, tuple(nets), items, term)
    ch = found.setdefault(key, _Choice(label, items, term, nets, order))
    ch.week |= atom


def _lists(cfg: SgConfig, ch: _Choice, cats: dict[str, listplan.Category]) -> tuple[list[str], list[str], set[str]]:
    """(allow, block, generated categories) of one pass list, noting each order our allow-first rule changes."""
    allow, block, gen, negatives = [], [], set(), []
    for it in ch.items:
        cat = listplan.IN_ADDR_CAT if it.name == IN_ADDR else it.name
        if it.name == IN_ADDR:
            gen.add(cat)
            _once(cfg, it.line, f"{'' if it.allow else '!'}in-addr", "carried as the expression category "
                  f"{cat}, which sees whole URLs only: in tls: sni mode a CONNECT to an IP address is decided by the "
                  "domain lists alone (list the addresses in a domains file to cover it)")
        if it.allow:
            for neg in negatives:
                _order_note(cfg, it, neg, cats)
            allow.append(cat)
        else:
            block.append(cat)
            negatives.append(it)
    if ch.terminator is not None and not TERMINATORS[ch.terminator.name]:
        block.append(listplan.NONE_CAT)
        gen.add(listplan.NONE_CAT)
        _once(cfg, ch.terminator.line, "none", f"carried as the category {listplan.NONE_CAT} (an expression matching "
              "every URL): in tls: sni mode a CONNECT to a host no list names is allowed, as our engine has no "
              "\"block everything else\" for host-only decisions")
    return allow, block, gen


def _order_note(cfg: SgConfig, pos: PassItem, neg: PassItem, cats: dict[str, listplan.Category]) -> None:
    a, b = cats.get(pos.name), cats.get(neg.name)
    if pos.name == IN_ADDR or neg.name == IN_ADDR:
        other = b if pos.name == IN_ADDR else a
        why = listplan.in_addr_overlap(other) if other else None
    else:
        why = listplan.overlap(a, b) if a and b else None
    if why is not None:
        note = (f"pass {pos.name} after !{neg.name}", f"SquidGuard blocks a URL listed in both (the first match in "
                f"the pass list decides); here allow lists win, so it is allowed (both may list: {why}); remove it "
                f"from {pos.name} or move {pos.name} before !{neg.name}")
        _once(cfg, pos.line, *note)


def _once(cfg: SgConfig, line: int, what: str, why: str) -> None:
    """A note for a pass list item, which several policies may share."""
    if all((n.line, n.what) != (line, what) for n in cfg.notes):
        cfg.note(line, what, why)


def _used(cfg: SgConfig) -> list[str]:
    names = []
    for acl in [*cfg.acls, cfg.default]:
        for br in (acl.branch, acl.orelse):
            for it in (br.passes or []) if br else []:
                if it.name in cfg.dests and it.name not in names:
                    names.append(it.name)
    return names


def translate(cfg: SgConfig, dbhome: Optional[str] = None, clients: Optional[list[Net]] = None) -> Result:
    """The filter section (and the categories to write) that decides as cfg does; cfg.notes lists the rest.
    clients: the addresses that may use the proxy at all (proxy.clients): policies are cut to them."""
    dbhome = dbhome or cfg.dbhome
    if dbhome is None:
        cfg.note(1, "dbhome", "not set: relative list paths are read beside the configuration file "
                 "(give --dbhome DIR otherwise)", False)
    for name in _used(cfg):
        if not CATEGORY_RE.match(name):
            raise SquidGuardError(f"{cfg.path}:{cfg.dests[name].line}: dest {name}: not usable as a category "
                                  "directory name (letters, digits, _ . + -; rename the dest)")
    cats = {name: listplan.load(cfg, dbhome, cfg.dests[name]) for name in _used(cfg)}
    for name, d in cfg.dests.items():
        if name not in cats:
            cfg.note(d.line, f"dest {name}", "not named in any acl: not copied", False)
    _default_checks(cfg)
    rules = _rules(cfg, dbhome)
    policies, generated, seen = [], set(), {}
    for ch in _choices(cfg, rules):
        if clients is not None:
            ch.nets = intersect(ch.nets, clients)
            if not ch.nets:
                continue
        allow, block, gen = _lists(cfg, ch, cats)
        generated |= gen
        if not allow and not block:
            continue  # nothing listed: everything passes, which is what no policy does too
        seen[ch.label] = seen.get(ch.label, 0) + 1
        name = ch.label if seen[ch.label] == 1 else f"{ch.label}-{seen[ch.label]}"
        pol = {"name": name, "clients": [str(n) for n in ch.nets], "block": block, "allow": allow}
        sched = sgtime.render(ch.week)
        if sched is not None:
            pol["schedule"] = sched
        policies.append({k: v for k, v in pol.items() if v != []})
    return Result(_section(policies), cats, generated, sorted(cfg.notes, key=lambda n: n.line))


def _section(policies: list[dict]) -> dict:
    """The default acl alone (for every address at all times) becomes the global lists; anything else stays policies."""
    out: dict = {"lists": "lists/"}
    if len(policies) == 1 and policies[0]["clients"] == [str(EVERYTHING)] and "schedule" not in policies[0]:
        only = policies[0]
        out["block"], out["allow"] = only.get("block", []), only.get("allow", [])
        return {k: v for k, v in out.items() if v != []}
    out["policies"] = policies
    return out
