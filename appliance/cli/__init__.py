"""The `appliance` command group: shared options (-c, --node, -v) and the registry of subcommands."""
from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from appliance.core import paths as pathmod
from appliance.core.errors import EXIT_BAD_INPUT, ApplianceError
from appliance.core.errors import report as report_error  # not `report`: the name of the report command's module
from appliance.core.loader import load
from appliance.core.model import Appliance
from appliance.core.paths import Paths

# command -> the module that defines it (each module registers its commands on `main` when imported). A command's
# module is imported only when that command runs: `appliance role`, which CARP runs at every transition, must not
# pay for the proxy, image or lab imports. tests/unit/test_cli_commands.py keeps this table complete.
COMMANDS = {
    "check": "appliance.cli.config", "render": "appliance.cli.config", "config-reference": "appliance.cli.config",
    "proxy": "appliance.cli.proxy", "reload": "appliance.cli.proxy", "explain": "appliance.cli.proxy",
    "role": "appliance.cli.ha", "carp": "appliance.cli.ha", "status": "appliance.cli.ha", "demote": "appliance.cli.ha",
    "promote": "appliance.cli.ha", "watchdog": "appliance.cli.ha", "carp-watch": "appliance.cli.ha",
    "liveness": "appliance.cli.liveness",
    "lab": "appliance.cli.lab", "vmlab": "appliance.cli.vmlab",
    "sync": "appliance.cli.sync", "sync-receive": "appliance.cli.sync", "sync-serve": "appliance.cli.sync",
    "releases": "appliance.cli.sync", "cron": "appliance.cli.sync",
    "keys": "appliance.cli.keys", "carp-rotate": "appliance.cli.rotate", "image": "appliance.cli.image",
    "report": "appliance.cli.report",
    "lists": "appliance.cli.lists",
    "admin": "appliance.cli.admin",
    "import": "appliance.cli.migrate",
}
COMMAND_MODULES = sorted(set(COMMANDS.values()))


def load_commands(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:  # a capability not built into this install
        if e.name != module:
            raise


class Ctx:
    """What every command gets: where the config is, which node this is, verbosity."""

    def __init__(self, config: str | None, node: str | None, verbose: int):
        self.config_arg = config
        self.node_arg = node
        self.verbose = verbose
        self._cfg: Appliance | None = None

    @property
    def config_path(self) -> Path:
        return pathmod.config_path(self.config_arg)

    @property
    def cfg(self) -> Appliance:
        if self._cfg is None:
            self._cfg = load(self.config_path)  # ConfigError: file:line messages, exit 2
        return self._cfg

    @property
    def paths(self) -> Paths:
        """This node's state dir ($APPLIANCE_STATE_DIR or the platform default)."""
        return Paths.default()

    @property
    def base_dir(self) -> Path:
        return self.config_path.resolve().parent

    @property
    def node(self) -> str:
        return pathmod.node_name(self.cfg, self.config_path, self.node_arg)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Stop the command with an error for the user (printed and turned into the exit status by the group)."""
    raise ApplianceError(str(message), code)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _set(attr: str):
    def cb(ctx: click.Context, param: click.Parameter, value):
        obj = ctx.find_object(Ctx)
        if obj is not None and value:
            setattr(obj, attr, getattr(obj, attr) + value if attr == "verbose" else value)
            if attr == "verbose":
                _logging(obj.verbose)
        return value
    return cb


def _shared_options() -> list[click.Option]:
    return [
        click.Option(["-c", "--config"], metavar="FILE", expose_value=False, callback=_set("config_arg"), help="cluster file (same as before the command)"),
        click.Option(["--node"], metavar="NAME", expose_value=False, callback=_set("node_arg"), help="which node this is"),
        click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_set("verbose"), help="more log output"),
    ]


class ApplianceGroup(click.Group):
    """A group whose subcommands (and their subcommands) also take -c/--node/-v after the command name."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            load_commands(COMMANDS[name])
        return super().get_command(ctx, name)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _add_shared(cmd)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApplianceError as e:
            ctx.exit(report_error(e))


def _add_shared(cmd: click.Command) -> None:
    have = {o for p in cmd.params for o in getattr(p, "opts", [])}
    cmd.params.extend(o for o in _shared_options() if not set(o.opts) & have)
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _add_shared(sub)
        orig = cmd.add_command

        def add(c: click.Command, name: str | None = None, _orig=orig) -> None:
            _add_shared(c)
            _orig(c, name)

        cmd.add_command = add  # type: ignore[method-assign]


def _logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr, force=True)


@click.group(cls=ApplianceGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-c", "--config", "config", metavar="FILE", help="cluster file [env APPLIANCE_CONFIG; default /etc/appliance/appliance.yaml, /usr/local/etc/appliance/appliance.yaml on FreeBSD]")
@click.option("--node", metavar="NAME", help="which node this is [env APPLIANCE_NODE; else node.yaml beside the config, then in the state dir]")
@click.option("-v", "--verbose", count=True, help="more log output (repeat for debug)")
@click.version_option(package_name="carpguard", prog_name="appliance")
@click.pass_context
def main(ctx: click.Context, config: str | None, node: str | None, verbose: int) -> None:
    """carpguard: an HA content-filter proxy appliance (CARP + mitmproxy + rsync sync)."""
    _logging(verbose)
    ctx.obj = Ctx(config, node, verbose)
