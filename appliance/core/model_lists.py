"""The `lists:` section: category list updates from a UT1 or Shallalist source, what to take, when (master only)."""
from __future__ import annotations

import re
from typing import Optional

from pydantic import Field, field_validator, model_validator

from appliance.core.modelbase import _Model, check_cron
from appliance.core.rules import CATEGORY_RE


class Lists(_Model):
    source: Optional[str] = Field(None, description="where `appliance lists update` takes lists from by default: an "
                                  "https URL, a tarball or a directory (UT1 or Shallalist layout)")
    sha256: Optional[str] = Field(None, description="the source tarball's SHA-256 (hex); a download that differs is "
                                  "refused")
    update_schedule: Optional[str] = Field(None, description="cron schedule of `appliance lists update` on the "
                                           "MASTER only (a backup never updates on its own); unset: by hand only")
    categories: dict[str, str] = Field(default_factory=dict, description="upstream category -> this config's "
                                       "category; only these are taken (empty: every upstream category, same name, "
                                       "a nested one as recreation-sports)")
    min_entries: int = Field(1, ge=1, description="a taken category with fewer entries is refused (an empty or "
                             "truncated download never replaces good lists)")
    min_ratio: float = Field(0.5, ge=0, le=1, description="a taken category may not shrink below this fraction "
                             "of its current entries in one update")

    @field_validator("update_schedule")
    @classmethod
    def _cron(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else check_cron(v)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.match(r"^[0-9a-fA-F]{64}$", v):
            raise ValueError("not a SHA-256 (64 hex digits)")
        return None if v is None else v.lower()

    @field_validator("categories")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for up, ours in v.items():
            parts = up.split("/")
            if len(parts) > 3 or not all(re.match(r"^[A-Za-z0-9_.-]{1,64}$", p) and p not in (".", "..")
                                         for p in parts):
                raise ValueError(f"upstream category {up!r}: letters, digits, '_', '.', '-' (a nested Shallalist "
                                 f"one as recreation/sports)")
            if not CATEGORY_RE.match(ours):
                raise ValueError(f"category {ours!r} (for {up!r}) is not a category name")
        return v

    @model_validator(mode="after")
    def _schedule_needs_source(self) -> "Lists":
        if self.update_schedule is not None and not self.source:
            raise ValueError("lists.update_schedule needs lists.source")
        return self
