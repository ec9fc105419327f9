"""The list update tests use the shared sync lab `lab` (a master and a backup with their own sshd on loopback)."""
import pytest


@pytest.fixture
def lab(sync_lab):
    return sync_lab
