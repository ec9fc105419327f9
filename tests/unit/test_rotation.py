"""Which CARP changes one node may apply while its peers still run the old config (appliance.core.rotation)."""
from __future__ import annotations

from pathlib import Path

from appliance.core.loader import load
from appliance.core.rotation import carp_step_error, heard_pass_error, pass_fingerprint, pass_step_error

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "appliance.yaml"


def cfg(**cluster):
    c = load(EXAMPLE)
    return c.model_copy(update={"cluster": c.cluster.model_copy(update=cluster)})


def test_every_carp_setting_a_peer_checks_is_a_step_error_naming_its_field():
    old = load(EXAMPLE)
    assert carp_step_error(old, load(EXAMPLE)) is None
    nodes = {k: v.model_copy() for k, v in old.nodes.items()}
    first = next(iter(nodes))
    nodes[first] = nodes[first].model_copy(update={"advskew": nodes[first].advskew + 7})
    err = carp_step_error(old, old.model_copy(update={"nodes": nodes}))
    assert err and f"nodes.{first}.advskew" in err and "Stop `appliance carp` on each backup" in err
    # the node that applies it may raise its own advskew (it only becomes less preferred), never lower it
    raised = old.model_copy(update={"nodes": nodes})
    assert carp_step_error(old, raised, own=[first]) is None
    assert carp_step_error(raised, old, own=[first]) is not None
    assert carp_step_error(old, raised, own=[n for n in nodes if n != first]) is not None
    for field, value in (("advbase", old.cluster.advbase + 1), ("vhid", old.cluster.vhid % 255 + 1),
                         ("interface", "em7")):
        err = carp_step_error(old, cfg(**{field: value}))
        assert err and f"cluster.{field}" in err, field
    assert carp_step_error(old, cfg(preempt=not old.cluster.preempt)) is None   # both nodes still hear each other


def test_the_pass_peers_are_heard_signing_with_must_stay_accepted():
    from pydantic import SecretStr
    a, b = "pass-a", "pass-b"
    phase0 = cfg(password=SecretStr(a), password_next=None).cluster
    phase2 = cfg(password=SecretStr(b), password_next=SecretStr(a)).cluster
    phase3 = cfg(password=SecretStr(b), password_next=None).cluster
    heard_a, heard_b = {"10.0.0.1": pass_fingerprint(a)}, {"10.0.0.1": pass_fingerprint(b)}
    assert pass_step_error(phase2, phase3) is None                   # pairwise alone: the walk looks fine
    err = pass_step_error(phase2, phase3, heard_a)                   # but the master still signs with a
    assert err and "10.0.0.1" in err and "no longer accepts" in err
    assert pass_step_error(phase2, phase3, heard_b) is None          # the master switched: the finish is safe
    assert pass_step_error(phase2, phase0) is not None               # a repair without knowing the peers: refused
    assert pass_step_error(phase2, phase0, heard_a) is None          # the master is heard on a: the repair is safe
    assert heard_pass_error(phase3, {}) is None
    assert pass_fingerprint(a) != pass_fingerprint(b) and a not in pass_fingerprint(a)
