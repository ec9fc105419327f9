"""Sync figures over a real sshd + rsync on loopback: no-change sync, one-line change in a 1,000,000-line list."""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

LINES = 1_000_000


def _sync(node) -> tuple[float, dict]:
    t0 = time.monotonic()
    code, r = node.sync(timeout=240)
    took = time.monotonic() - t0
    if code != 0:
        raise RuntimeError(f"sync failed (exit {code}): {r}")
    return took, r


def main() -> None:
    import pytest

    from tests.support.sync_lab import SyncLab

    with tempfile.TemporaryDirectory(prefix="bench-sync-") as d:
        try:
            lab = SyncLab(Path(d))
        except pytest.skip.Exception as e:
            print(f"skipped: {e}")
            return
        try:
            lab.backup.start_sshd()
            rnd = random.Random(1)
            lst = lab.master.tree / "lists" / "adult" / "domains"
            lines = [f"d{i}-{rnd.getrandbits(40):010x}.example\n" for i in range(LINES)]
            lst.write_text("".join(lines))
            size = lst.stat().st_size
            print(f"list: {LINES:,} lines, {size / 1e6:.1f} MB (lists/adult/domains)")

            t_full, r = _sync(lab.master)
            full = r["peers"][0]
            print(f"initial sync (whole tree, generation {r['generation']}): {t_full:.2f} s, "
                  f"{full['bytes_sent']:,} bytes sent, transfer {full['transfer_seconds']:.2f} s")

            t_none, r = _sync(lab.master)
            assert r["peers"][0]["action"] == "up-to-date", r
            print(f"no-change sync: {t_none:.2f} s (peer {r['peers'][0]['action']})")

            lines[LINES // 2] = "one-changed-line.example\n"
            lst = lab.master.tree / "lists" / "adult" / "domains"
            lst.write_text("".join(lines))
            t_one, r = _sync(lab.master)
            one = r["peers"][0]
            assert "one-changed-line.example" in (lab.backup.tree / "lists" / "adult" / "domains").read_text()
            sent = one["bytes_sent"]
            print(f"one-line change: {t_one:.2f} s (master check+compile {r['check_seconds']:.2f} s, cut {r['cut_seconds']:.2f} s, "
                  f"transfer {one['transfer_seconds']:.2f} s, receive+check+swap "
                  f"{one['receive']['seconds']:.2f} s), {sent:,} bytes sent, files changed: {', '.join(one['changed'])}")
            print(f"ratio bytes sent / list size: {sent / size:.5f} ({100 * sent / size:.3f} % ; target well under 1 %)")
            print(f"ratio bytes sent one-line change / initial whole-tree transfer: {sent / full['bytes_sent']:.5f}")
        finally:
            lab.close()


if __name__ == "__main__":
    main()
