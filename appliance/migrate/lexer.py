"""SquidGuard's configuration tokens: words and braces with their line numbers, `#` comments, no quoting."""
from __future__ import annotations

from dataclasses import dataclass

from appliance.core.errors import BadInput

MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a generated squidGuard.conf is a few KB; lists live in their own files


class SquidGuardError(BadInput):
    """Input SquidGuard itself would refuse (or that we cannot read), as `file:line: message`."""


@dataclass(frozen=True)
class Token:
    text: str
    line: int


def read_config(path: str) -> str:
    """The file as text; a SquidGuardError naming the file when it cannot be read or is not a text file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise SquidGuardError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise SquidGuardError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a squidGuard.conf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # old configs carry latin-1 comments; SquidGuard reads bytes


def tokenize(text: str, path: str) -> list[Token]:
    """Tokens as SquidGuard's lexer cuts them: `{` and `}` alone, words up to white space, a brace or `#` (which
    starts a comment to the end of the line). A rewrite substitution `s@from@to@` is one word even when it holds `#`
    or `{`. Newlines separate nothing more than spaces do: SquidGuard's grammar has no line continuation because
    it needs none, so a statement's words may go on over several lines."""
    out: list[Token] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        i, n = 0, len(line)
        while i < n:
            c = line[i]
            if c in " \t\r\f\v":
                i += 1
            elif c == "#":
                break
            elif c in "{}":
                out.append(Token(c, lineno))
                i += 1
            elif ord(c) < 32 or ord(c) == 127:
                raise SquidGuardError(f"{path}:{lineno}: control character {c!r} in the configuration")
            else:
                j = i
                subst = line.startswith("s@", i)
                stops = " \t\r\f\v}" if subst else " \t\r\f\v{}#"
                while j < n and line[j] not in stops:
                    j += 1
                out.append(Token(line[i:j], lineno))
                i = j
    return out
