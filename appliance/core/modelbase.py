"""What every section of the cluster model shares: the strict base model, client networks, cron schedules."""
from __future__ import annotations

import ipaddress
import re
from ipaddress import IPv4Network
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

CRON_FIELD_RE = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
CRON_SHORTHANDS = ("@hourly", "@daily", "@weekly", "@monthly", "@reboot")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _network(x: Any) -> Any:
    if isinstance(x, str):
        try:
            return ipaddress.IPv4Network(x, strict=True)
        except ValueError as e:
            if "has host bits set" in str(e):
                raise ValueError(f"{x} has host bits set (did you mean {ipaddress.IPv4Network(x, strict=False)}?)")
            raise ValueError(f"{x} is not an IPv4 network") from None
    return x


def _strict_nets(v: Any) -> Any:
    return [_network(x) for x in v] if isinstance(v, list) else v


# client subnets are written as networks: 192.168.1.5/24 (host bits set) is refused, with the fix in the message
StrictNetworks = Annotated[list[IPv4Network], BeforeValidator(_strict_nets)]


def check_cron(v: str) -> str:
    """A 5-field cron schedule or one of CRON_SHORTHANDS; ValueError saying why not."""
    fields = v.split()
    if v.startswith("@"):
        if v not in CRON_SHORTHANDS:
            raise ValueError("unknown cron shorthand")
        return v
    if len(fields) != 5 or not all(CRON_FIELD_RE.match(f) for f in fields):
        raise ValueError("must be a 5-field cron schedule such as '*/5 * * * *'")
    return v
