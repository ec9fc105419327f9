"""Take back a cut on the master whose own index cannot be compiled: the previous release live again, as before."""
from __future__ import annotations

import logging
from pathlib import Path

from sync.journal import note
from sync.releases import Releases, mirror


def uncut(rel: Releases, work: Path, live: int | None, gen: int, restored: bool) -> str:
    """Point `current` back at release <live> and its staging base with it; the working tree keeps the edits.

    restored: the cut put <live>'s content back as it went live (the working tree was that release, edited in
    place): staging mirrors it again, then the edits go back into it from the cut release, so that the next sync
    checks them again (in full where the changed-lines check cannot vouch for them) instead of taking them as live.
    Release <gen> stays, not live, for a look (`appliance releases`). Returns what was done, for the report."""
    if live is None:  # nothing to go back to: the new release stays, the proxy is not reloaded
        return f"generation {gen} stays (there is no earlier release to put back)"
    rel.activate(live)
    if restored:
        mirror(rel.path(live), rel.staging, transfer=True)
        rel.write_staging_meta(live, rel.meta(live, compute=False)["hash"])
        if Path(work).resolve() == rel.path(live).resolve():
            mirror(rel.path(gen), rel.path(live), transfer=True)  # its compiled/ and metadata stay
    else:  # the staging mirror now holds <gen>, and <live>'s content as it went live is not at hand: no base
        rel.clear_staging()
    msg = f"generation {live} is live again (generation {gen} was cut but this node could not compile its index)"
    note(rel.state, msg, logging.ERROR)
    return msg
