"""Reading appliance.yaml: YAML with duplicate keys, anchors and aliases refused, at most MAX_CONFIG_BYTES, validation
errors as `file:line: path: message (got value)`."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from appliance.core.errors import ConfigError
from appliance.core.model import Appliance
from appliance.core.rules import ClusterRuleError


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a cluster file is a few KB; anything near this is not one
NO_ALIASES = "YAML anchors/aliases are not allowed"
MAX_DEPTH = 64  # nesting levels of lists/mappings; a cluster file needs fewer than 10


class AliasRefused(yaml.MarkedYAMLError):
    """An anchor (&a) or alias (*a) in the input: refused while composing, before anything is built (a few
    nested aliases expand to gigabytes: the billion-laughs file)."""


class NestedTooDeep(yaml.MarkedYAMLError):
    """More than MAX_DEPTH nested lists/mappings: refused while composing, before PyYAML's recursive composer and
    constructor could run out of stack (a RecursionError with a traceback)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (a second `fw1:` must not silently win) and any anchor or
    alias (checked on each event as the document is composed, so nothing is ever expanded)."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        ev = self.peek_event()
        if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None) is not None:
            what = f"alias *{ev.anchor}" if isinstance(ev, yaml.AliasEvent) else f"anchor &{ev.anchor}"
            raise AliasRefused(None, None, f"{NO_ALIASES} ({what})", ev.start_mark)
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            raise NestedTooDeep(None, None, f"nested too deeply (more than {MAX_DEPTH} levels)", ev.start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_map(node: yaml.Node | None, prefix: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Field path (as a tuple of keys/indexes) -> 1-based line in the YAML source."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
            out[prefix + (key,)] = k.start_mark.line + 1
            _line_map(v, prefix + (key,), out)
            out[prefix + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[prefix + (i,)] = v.start_mark.line + 1
            _line_map(v, prefix + (i,), out)
    return out


def _fmt_path(loc: tuple) -> str:
    s = ""
    for part in loc:
        if isinstance(part, int):
            s += f"[{part}]"
        else:
            s += ("." if s else "") + str(part)
    return s


def _parse_path(path: str) -> tuple:
    parts: list = []
    for m in re.finditer(r"([^.\[\]]+)|\[(\d+)\]", path):
        parts.append(int(m.group(2)) if m.group(2) is not None else m.group(1))
    return tuple(parts)


def _line_for(lines: dict[tuple, int], loc: tuple) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _shown(value: Any, loc: tuple) -> str:
    if any("password" in str(p) for p in loc):  # the CARP pass, password_next, admin.password_hash
        return "(hidden)"
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _clean_loc(loc: tuple) -> tuple:
    # pydantic adds the union member / validator names to the location; drop them
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("function-after", "literal['any','vip']", "IPv4Address", "int", "str", "literal['auto']"))))


def validate(data: Any, source: str = "<config>", text: str | None = None, base_dir: Path | None = None) -> Appliance:
    """Validate parsed YAML; raise ConfigError with one `file:line: path: message (got value)` per problem."""
    lines: dict[tuple, int] = {}
    if text is not None:
        try:
            lines = _line_map(yaml.compose(text, Loader=_UniqueKeyLoader))
        except yaml.YAMLError:
            lines = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the file must be a mapping with cluster, nodes, proxy, ... (got {type(data).__name__})")
    ctx = {"base_dir": base_dir} if base_dir is not None else None
    try:
        return Appliance.model_validate(data, context=ctx)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, ClusterRuleError):
                for path, msg in ctx_err.problems:
                    loc = _parse_path(path)
                    line = _line_for(lines, loc)
                    problems.append(_problem(source, line, path, msg, _value_at(data, loc)))
                continue
            loc = _clean_loc(tuple(err["loc"]))
            line = _line_for(lines, loc)
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (typo?)"
            problems.append(_problem(source, line, _fmt_path(loc) or "(top)", msg, err.get("input")))
        raise ConfigError("\n".join(problems), problems) from None


def _problem(source: str, line: int | None, path: str, msg: str, value: Any) -> str:
    where = f"{source}:{line}" if line else source
    got = "" if value is None or isinstance(value, (dict,)) else f" (got {_shown(value, _parse_path(path))})"
    return f"{where}: {path}: {msg}{got}"


def _value_at(data: Any, loc: tuple) -> Any:
    for p in loc:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> data; ConfigError `source:line:col: ...` on a syntax error, a duplicate key, an anchor or alias."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters; a cluster file may have at most {MAX_CONFIG_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except (AliasRefused, NestedTooDeep) as e:
        mark = e.problem_mark
        raise ConfigError(f"{source}:{mark.line + 1}:{mark.column + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: YAML error: {e}") from None


def read_capped(p: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    """The file as UTF-8 text, reading at most `limit` bytes (ConfigError beyond: never a whole huge file in memory)."""
    with open(p, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{p}: larger than {limit} bytes; a cluster file may have at most {limit} bytes")
    return data.decode("utf-8")


def load(path: str | os.PathLike, check_lists: bool = True) -> Appliance:
    """Read and validate a cluster file; list directories are checked relative to it."""
    p = Path(path)
    try:
        text = read_capped(p)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    data = parse_yaml(text, str(p))
    return validate(data, str(p), text, p.resolve().parent if check_lists else None)


def to_data(cfg: Appliance, reveal_secrets: bool = True) -> dict:
    data = cfg.model_dump(mode="json", exclude_defaults=False)
    # the other system's release key is not a setting of this cluster (loading it back would be refused)
    data["cluster"].pop("debian" if cfg.cluster.os == "freebsd" else "freebsd", None)
    if not reveal_secrets:
        data["cluster"]["password"] = "**********"
    return data


def dump_yaml(cfg: Appliance, reveal_secrets: bool = True) -> str:
    return yaml.safe_dump(to_data(cfg, reveal_secrets), sort_keys=False, default_flow_style=False)


