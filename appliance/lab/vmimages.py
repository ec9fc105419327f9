"""What the VM lab takes from an image build: each node's qcow2 (`make image CONFIG=examples/debian.yaml` ->
<out>/NODE.qcow2), the admin SSH key and each node's host key to pin (keys/admin_ed25519 and
keys/hosts/NODE/ssh_host_ed25519_key.pub, in the out dir or beside the cluster file). Missing pieces are one-line
errors naming what was looked for."""
from __future__ import annotations

from pathlib import Path

from appliance.lab.model import LabError
from sync import keys

ADMIN_KEY = "admin_ed25519"


def node_image(images: Path, node: str) -> Path:
    p = Path(images) / f"{node}.qcow2"
    if not p.is_file():
        raise LabError(f"no image for {node}: {p} is missing (run `make image CONFIG=...` first, or pass --images)")
    return p


def _first(candidates: list[Path], what: str) -> Path:
    for p in candidates:
        if p.is_file():
            return p
    raise LabError(f"no {what} (looked for {', '.join(map(str, candidates))}); it comes from the image build")


def admin_key(dirs: list[Path]) -> str:
    """The private admin key of the image build (root's authorized key in every image)."""
    return str(_first([d / n for d in dirs for n in (ADMIN_KEY, f"{keys.KEYS_DIR}/{ADMIN_KEY}")], "admin SSH key"))


def host_keys(dirs: list[Path], nodes: list[str]) -> dict[str, str]:
    """Each node's SSH host public key ('ssh-ed25519 AAAA...'), pinned in the lab's known_hosts."""
    out = {}
    for node in nodes:
        cands = [Path(str(keys.host_key(d, node)) + ".pub") for d in dirs]
        p = _first(cands, f"host key of {node}")
        parts = p.read_text().split()
        if len(parts) < 2:
            raise LabError(f"{p}: not an SSH public key")
        out[node] = f"{parts[0]} {parts[1]}"
    return out
