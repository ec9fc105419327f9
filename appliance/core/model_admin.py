"""The `admin:` section: where the read-only status page and /metrics listen, who may reach them, the password."""
from __future__ import annotations

import re
from ipaddress import IPv4Address
from typing import Literal, Optional, Union

from pydantic import Field, SecretStr, field_validator, model_validator

from appliance.core.modelbase import StrictNetworks, _Model

# cost 10 or more: a cheaper hash lets a stolen config be brute-forced and makes each check too cheap to matter
BCRYPT_RE = re.compile(r"^\$2[aby]\$(1[0-9]|2[0-9]|3[01])\$[./A-Za-z0-9]{53}$")
PRIVATE_LISTEN = ("loopback", "sync")  # reachable only from the box and over the dedicated sync link


class Admin(_Model):
    listen: list[Union[Literal["loopback", "sync", "lan"], IPv4Address]] = Field(
        default_factory=lambda: ["loopback", "sync"], min_length=1,
        description="where the admin listener binds: loopback, sync (the node's sync address), lan (its LAN "
                    "address) or an address; anything beyond loopback and sync needs admin.allow and a password")
    port: int = Field(8443, ge=1, le=65535, description="HTTPS port of the status page and /metrics")
    allow: StrictNetworks = Field(default_factory=list, description="management subnets that may connect when "
                                  "admin.listen opens the page beyond loopback and the sync link")
    user: str = Field("admin", description="HTTP Basic user name")
    password_hash: Optional[SecretStr] = Field(None, description="bcrypt hash of the password ($2b$..., cost 10 or "
                                               "more); required when admin.listen goes beyond loopback and sync; "
                                               "never logged")

    @field_validator("password_hash")
    @classmethod
    def _bcrypt(cls, v: Optional[SecretStr]) -> Optional[SecretStr]:
        if v is not None and not BCRYPT_RE.match(v.get_secret_value()):
            raise ValueError("not a bcrypt hash of cost 10 or more ($2b$12$ and 53 more characters; make one "
                             "with `appliance admin hash-password`)")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", v):
            raise ValueError("letters, digits, '_', '.', '-' only (1-64)")
        return v

    @model_validator(mode="after")
    def _open_needs_password(self) -> "Admin":
        if self.opened():
            if not self.allow:
                raise ValueError("admin.listen goes beyond loopback and sync: admin.allow must name the management "
                                 "subnets")
            if self.password_hash is None:
                raise ValueError("admin.listen goes beyond loopback and sync: admin.password_hash is required")
        return self

    def opened(self) -> bool:
        """Whether the page listens beyond loopback and the sync link (then allow and a password apply)."""
        return any(x not in PRIVATE_LISTEN for x in self.listen)
