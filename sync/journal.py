"""Sync log lines: to the Python logger, syslog (daemon facility) and <state>/sync/sync.log."""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("appliance.sync")


def note(state: Path, message: str, level: int = logging.INFO) -> None:
    """One line that an admin finds later (cron output is usually thrown away)."""
    log.log(level, message)
    try:
        import syslog

        syslog.openlog("appliance-sync", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR if level >= logging.ERROR else syslog.LOG_WARNING if level >= logging.WARNING else syslog.LOG_INFO, message)
    except (ImportError, OSError):
        pass
    try:
        path = Path(state) / "sync" / "sync.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {logging.getLevelName(level)} {message}\n")
    except OSError:
        pass
