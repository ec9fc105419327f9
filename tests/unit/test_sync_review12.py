"""Review 12, I1 and I3: generation/hash checks refuse a trailing newline; the rsync short-option check reads
`-e` only as `e.<caps>`, so letters after a bare `e` (-rtpeDog) are checked, and D/o/g are refused anywhere."""
from __future__ import annotations

from pathlib import Path

import pytest

from sync.errors import BAD_INPUT, SyncError
from sync.releases import parse_generation, parse_hash
from sync.serve import rsync_server_argv

STAGING = Path("/var/lib/appliance/sync/staging")
H = "a" * 64


@pytest.mark.parametrize("text", ["3\n", "12\n", "1\r\n"])
def test_generation_with_a_trailing_newline_is_refused(text) -> None:
    with pytest.raises(SyncError, match="not a generation number"):
        parse_generation(text)
    assert parse_generation("3") == 3


def test_hash_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(SyncError):
        parse_hash(H + "\n")
    assert parse_hash(H) == H


@pytest.mark.parametrize("opt", ["-rtpeDog", "-rtpe", "-rtpeo", "-rtpe.Dog", "-rtpe.iLsfxCIvuo", "-rtpe.iLs\n"])
def test_rsync_args_letters_after_a_bare_e_are_checked(opt) -> None:
    with pytest.raises(SyncError) as e:
        rsync_server_argv(["rsync", "--server", opt, "--delete", ".", "staging"], STAGING)
    assert e.value.exit_code == BAD_INPUT


def test_rsync_args_capability_string_still_kept() -> None:
    argv = rsync_server_argv(["rsync", "--server", "-rtpe.iLsfxCIvu", "--delete", ".", "staging"], STAGING)
    assert argv[2] == "-rtpe.iLsfxCIvu"
