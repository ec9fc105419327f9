"""Shared fixtures: the example tree, a state dir, one origin per module, the sync lab, the one Debian image build;
the `root` marker."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support.debian_build import debian_config, debian_deb, debian_dist  # noqa: F401 (session fixtures)
from tests.support.env import copy_examples
from tests.support.proxy import start_origin
from tests.support.sync_lab import SyncLab


# The longest modules start first, so with workers they run beside the many short ones instead of after them: the
# VM lab (in make test a part of its own; first here for a run of everything in one process or by hand), the Debian
# image build and its tests, the .deb builds, then the other modules that took over 30 s on one worker (the sync
# labs, the CLI's bad-input table, the fuzzers: x16's --durations=0); in x16, with only the first three named, the
# part's last 100 s kept the two cores 53-73% busy, which is what a long module that starts late does. Then the
# modules with more tests (what xdist's own reordering would do; make test turns that off to keep this order).
FIRST = ("tests/integration/lab/test_vmlab.py", "tests/integration/image/test_debian_image.py",
         "tests/integration/image/test_deb.py", "tests/integration/sync/test_sync_integration.py",
         "tests/integration/sync/test_sync_stolen_key.py", "tests/integration/sync/test_sync_escape.py",
         "tests/unit/test_cli_bad_input.py", "tests/unit/test_fuzz_fastpath.py",
         "tests/integration/proxy/test_proxy_lifecycle.py", "tests/integration/lab/test_lab_sync.py")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM ends a run as Ctrl-C does, with every fixture's teardown (labs, VMs, namespaces): make test stops its
    VM part that way when it is itself stopped, and a background job cannot be sent SIGINT (it ignores it)."""
    me = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != me:  # a process forked from this one (a test's helper) dies of SIGTERM as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # xdist's workers are stopped by their controller
        signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the sync lab runs private sshd instances on 127.0.0.x: root, whatever test asks for it
    for item in items:
        if "sync_lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.root)
    module = lambda i: i.nodeid.split("::", 1)[0]
    size: dict[str, int] = {}
    for item in items:
        size[module(item)] = size.get(module(item), 0) + 1
    first = lambda i: next((n for n, m in enumerate(FIRST) if i.nodeid.startswith(m)), len(FIRST))
    items.sort(key=lambda i: (first(i), -size[module(i)]))  # stable: a module's tests keep their order


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """make test's workers (pytest-xdist) get whole modules, never single tests: module fixtures (a lab, a booted VM
    pair) and tests that build on the one before stay together. An xdist_group spanning modules is one unit: the
    Debian image tests and the VM lab share one image build."""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):  # "path::test[params]@group" (--dist loadgroup)
                return nodeid.rsplit("@", 1)[1]
            return nodeid.split("::", 1)[0]

    return ModulesAndGroups(config, log)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, sshd, privileged ports); CI runs as root")


@pytest.fixture
def example_tree(tmp_path: Path) -> Path:
    """A writable copy of examples/ as on a clean clone (appliance.yaml, debian.yaml, lists/; not the keys/ and
    compiled/ a build leaves there); returns the config file path."""
    copy_examples(tmp_path / "etc")
    return tmp_path / "etc" / "appliance.yaml"


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(d))
    monkeypatch.setenv("APPLIANCE_HOOKS_DIR", str(d / "hooks.d"))  # node-local hooks: never the host's
    return d


@pytest.fixture(scope="module")
def origin():
    """A local 1 KB HTTP origin on loopback for one test module (the proxy tests); yields its port."""
    srv, port = start_origin()
    yield port
    srv.shutdown()


@pytest.fixture
def sync_lab(tmp_path: Path):
    lab = SyncLab(tmp_path)
    lab.backup.start_sshd()
    try:
        yield lab
    finally:
        lab.close()


