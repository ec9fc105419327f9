"""`receive ... --after-transfer` (sync/serve.py): started beside the transfer, it goes on only at the master's word."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from appliance.core.paths import Paths
from sync import serve
from sync.errors import BAD_INPUT, PEER_FAILED, SyncError
from sync.peer import STAGED
from sync.serve import wait_for_transfer


def _pipe(data: bytes, close: bool = True):
    r, w = os.pipe()
    os.write(w, data)
    if close:
        os.close(w)
    return os.fdopen(r, "rb"), (None if close else w)


def test_a_receive_started_beside_the_transfer_goes_on_only_at_the_masters_word() -> None:
    stream, _ = _pipe(STAGED)
    wait_for_transfer(stream, timeout=5)
    for said in (b"", b"stage", b"staged!\n", b"x" * 100):  # end of file (the transfer failed) or anything else
        stream, _ = _pipe(said)
        with pytest.raises(SyncError) as e:
            wait_for_transfer(stream, timeout=5)
        assert e.value.exit_code == PEER_FAILED and "nothing done" in str(e.value)
    stream, w = _pipe(b"sta", close=False)  # a master that says nothing more: bounded
    with pytest.raises(SyncError, match="within 0 s"):
        wait_for_transfer(stream, timeout=0.2)
    os.close(w)


def test_the_receive_waits_before_it_touches_anything(tmp_path: Path, monkeypatch) -> None:
    """No word from the master: the staging dir keeps what arrived (the next delta's base), nothing is locked."""
    staging = tmp_path / "sync" / "staging"
    staging.mkdir(parents=True)
    (staging / "kept").write_text("what arrived")
    stream, _ = _pipe(b"")
    monkeypatch.setattr(serve.sys, "stdin", io.TextIOWrapper(stream))
    with pytest.raises(SyncError, match="nothing done"):
        serve.dispatch(f"receive 3 {'a' * 64} --after-transfer", Paths(tmp_path))
    assert (staging / "kept").read_text() == "what arrived"
    with pytest.raises(SyncError) as e:
        serve.dispatch(f"receive 3 {'a' * 64} --after-transfer --force", Paths(tmp_path))  # flags in their order
    assert e.value.exit_code == BAD_INPUT


def test_an_older_peer_or_one_that_stopped_waiting_gets_the_plain_receive(monkeypatch) -> None:
    from sync import peer as peermod

    asked: list[str] = []

    def fake_ask(peer, command, what, started=None, line=b""):
        asked.append(command)
        if command.endswith("--after-transfer"):
            raise SyncError(said, BAD_INPUT)
        return {"ok": True}

    monkeypatch.setattr(peermod, "ask", fake_ask)
    for said in (f"fw2 refused generation 3: receive: expected `receive GENERATION HASH [--force]` (got 'receive 3 "
                 f"{'a' * 64} --after-transfer')",
                 "fw2 refused generation 3: receive --after-transfer: the master did not say the transfer was done"):
        asked.clear()
        assert peermod.finish_receive(object(), "receive 3 x", object(), "w") == {"ok": True}  # type: ignore[arg-type]
        assert asked == ["receive 3 x --after-transfer", "receive 3 x"]
    said = "fw2 refused generation 3: lists/adult/domains:7: not a valid domain name: 'x y'"  # a refusal stays one
    with pytest.raises(SyncError, match="adult/domains:7"):
        peermod.finish_receive(object(), "receive 3 x", object(), "w")  # type: ignore[arg-type]
