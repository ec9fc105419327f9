"""The sync tests call the shared sync lab `lab`."""
import pytest


@pytest.fixture
def lab(sync_lab):
    return sync_lab
