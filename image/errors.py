"""Errors the image build reports: bad input (exit 2), a missing tool, a bad FreeBSD dist, a failed check."""
from __future__ import annotations

from appliance.core.errors import ApplianceError


class BuildError(ApplianceError):
    """Something the build cannot do; the message says what and where (exit 1 unless a subclass says)."""


class MissingTool(BuildError):
    exit_code = 3

    def __init__(self, tool: str, package: str, why: str = ""):
        super().__init__(f"missing tool {tool!r} {why}: install the Debian package {package} "
                         f"(apt-get install {package}, or run `make image` as root)".replace("  ", " "))
        self.tool = tool


class BadInput(BuildError):
    exit_code = 2


class BadDist(BuildError):
    exit_code = 2


class CheckFailed(BuildError):
    exit_code = 1

    def __init__(self, problems: list[str]):
        super().__init__("the rendered image failed its checks:\n" + "\n".join(problems))
        self.problems = problems
