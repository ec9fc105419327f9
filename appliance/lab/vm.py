"""One qemu VM of the VM lab: the accelerator (KVM only after a bounded probe boots a kernel, else TCG), the
copy-on-write overlay, the qemu command line (tap NICs with fixed MACs, serial console to a file, no user-mode
network), starting it inside the lab's namespace, proving a PID is our qemu, and the console's tail."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from appliance.core.pids import alive, cmdline
from appliance.ha import ip as netns
from appliance.lab.model import LabError
from appliance.lab.vmmodel import VmNode

QEMU = "qemu-system-x86_64"
MEMORY_MB = int(os.environ.get("APPLIANCE_VMLAB_MEMORY", "1024"))
# vCPUs per VM. 1 vCPU per VM was tried on this 2-core host and booted slower (vmlab up over 500 s, against 191 s
# with 2)
CPUS = {"kvm": 2, "tcg": 2}
CPUS_ENV = "APPLIANCE_VMLAB_CPUS"
# TCG runs a VM's vCPUs round-robin on one host thread (thread=single), not one thread each (MTTCG, qemu's default):
# two VMs of two vCPUs on two host cores made four threads, and a vCPU waiting for its descheduled sibling (an IPI, a
# TLB shootdown, RCU) spun on a core the other VM needed. Same image, same host (docs/lab.md): vmlab up 169 s against
# 193 s, the guest's systemd-analyze 68 s against 100 s, and the kernel's rcu_preempt thread from 18 s of CPU to
# under 8 s. $APPLIANCE_VMLAB_TCG_THREAD=multi goes back.
TCG_THREAD_ENV = "APPLIANCE_VMLAB_TCG_THREAD"
KVM_PROBE_SECONDS = 15.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
KVM_BOOTED = (b"Linux version", b"Reached target")   # a kernel that prints either of these runs under KVM


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def mac(lab_name: str, node: str, nic: int) -> str:
    """A fixed, locally administered unicast MAC per lab, node and NIC (52:54:00 is qemu's own prefix)."""
    h = hashlib.sha256(f"{lab_name}/{node}/{nic}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def _cpu_has_virt() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {f}" in flags for f in ("vmx", "svm"))


def choose_accel(image: str, workdir: Path) -> str:
    """'kvm' only when /dev/kvm is usable, the CPU shows vmx/svm and a bounded boot of `image` reaches the
    kernel; 'tcg' otherwise. $APPLIANCE_VMLAB_ACCEL (kvm|tcg) decides without probing."""
    forced = os.environ.get("APPLIANCE_VMLAB_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not _cpu_has_virt():
        return "tcg"
    return "kvm" if _kvm_boots(image, workdir) else "tcg"


def _kvm_boots(image: str, workdir: Path) -> bool:
    """Boot `image` read-only (-snapshot) under KVM with no network for at most KVM_PROBE_SECONDS: did the kernel
    print on the serial console? (Here KVM starts SeaBIOS and then hangs silently.)"""
    log = workdir / "kvm-probe.console"
    argv = [QEMU, "-accel", "kvm", "-m", "512", "-nodefaults", "-no-user-config", "-display", "none",
            "-nic", "none", "-snapshot", "-serial", f"file:{log}",
            "-drive", f"file={image},if=virtio,format=qcow2,readonly=on"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline, ok = time.monotonic() + KVM_PROBE_SECONDS, False
    try:
        while time.monotonic() < deadline and p.poll() is None and not ok:
            time.sleep(0.5)
            ok = log.exists() and any(m in log.read_bytes() for m in KVM_BOOTED)
    finally:
        p.kill()
        p.wait(timeout=10)
        log.unlink(missing_ok=True)
    return ok


def create_overlay(image: str, overlay: str) -> None:
    """A qcow2 overlay backed by the (never written) image: the VM's disk, discarded by `vmlab down`."""
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(Path(image).resolve()), "-F", "qcow2",
                        overlay], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise LabError(f"qemu-img create {overlay}: {r.stderr.strip() or r.stdout.strip()}")


def qemu_argv(name: str, vm: VmNode, accel: str) -> list[str]:
    """The VM's command line: disk = the overlay, eth0 = LAN tap, eth1 = sync tap (fixed PCI slots and MACs),
    serial console to a file, no display, no monitor, no default devices, no user-mode network."""
    thread = "multi" if os.environ.get(TCG_THREAD_ENV) == "multi" else "single"
    how = f"tcg,thread={thread}" if accel == "tcg" else accel
    argv = [QEMU, "-name", f"{name},process={name}", "-machine", "pc", "-accel", how, "-m", str(MEMORY_MB),
            "-smp", os.environ.get(CPUS_ENV) or str(CPUS[accel]), "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-chardev", f"file,id=ser0,path={vm.console},append=on", "-serial", "chardev:ser0",
            "-drive", f"file={vm.overlay},if=none,id=disk0,format=qcow2",
            "-device", "virtio-blk-pci,drive=disk0,bus=pci.0,addr=0x5",
            "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0,addr=0x6"]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    for i, (tap, hw) in enumerate(zip(vm.taps, vm.macs)):
        argv += ["-netdev", f"tap,id=nic{i},ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=nic{i},mac={hw},bus=pci.0,addr={hex(3 + i)}"]
    return argv


def start(ns: str, name: str, vm: VmNode, accel: str) -> int:
    """Start the VM inside namespace `ns` (`ip netns exec` execs, so the PID is qemu's: SIGKILL = power loss).
    LabError with qemu's own words when it exits at once."""
    if vm.boots == 0:
        Path(vm.console).write_bytes(b"")
    with open(vm.qemu_log, "ab") as out:
        p = subprocess.Popen(netns.in_ns(ns, qemu_argv(name, vm, accel)), stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    if p.poll() is not None:
        raise LabError(f"{name}: qemu exited at once ({p.returncode}): {tail(vm.qemu_log, 3, ' | ')}")
    return p.pid


def is_ours(pid: int | None, vm: VmNode) -> bool:
    """The PID runs qemu on this VM's overlay (a recorded PID may since belong to anything else)."""
    if not alive(pid):
        return False
    argv = cmdline(pid) or []
    return bool(argv) and os.path.basename(argv[0]).startswith("qemu-system") and any(vm.overlay in a for a in argv)


def power_off(vm: VmNode, grace: float = 5.0) -> bool:
    """SIGKILL the VM's qemu (a power cut) when the recorded PID is provably ours; waits until it is gone."""
    pid = vm.qemu_pid
    if not is_ours(pid, vm):
        return False
    os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)  # type: ignore[arg-type]
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return True


def tail(path: str | Path, lines: int = 40, sep: str = "\n") -> str:
    """The last `lines` lines of a console or log file (control characters dropped), or '' when absent."""
    try:
        text = Path(path).read_bytes().decode(errors="replace")
    except OSError:
        return ""
    text = ANSI.sub("", text.replace("\r\n", "\n")).replace("\r", "\n")
    clean = "".join(c for c in text if c in "\n\t" or c.isprintable())
    return sep.join(x.rstrip() for x in clean.splitlines()[-lines:])


def console_has(vm: VmNode, marker: str, since: int = 0) -> bool:
    """The marker is on the console (after byte offset `since`: the current boot's part)."""
    try:
        with open(vm.console, "rb") as f:
            f.seek(since)
            return marker.encode() in f.read()
    except OSError:
        return False


def console_size(vm: VmNode) -> int:
    try:
        return Path(vm.console).stat().st_size
    except OSError:
        return 0
