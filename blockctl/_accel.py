"""Choosing the accelerator: KVM only where it can really run a guest, TCG otherwise.

``/dev/kvm`` existing is not enough. On hosts that are themselves PVM-nested guests (such as
Firecracker with ``kvm_pvm``) the device opens fine but an unmodified guest kernel is emulated
instruction by instruction and dies with "KVM internal error" (guest.md §0). So KVM needs all
of: a read-write ``/dev/kvm``, hardware virtualisation flags (vmx or svm) in /proc/cpuinfo, and
no ``kvm_pvm`` module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from blockctl.types import Accel


@dataclass(frozen=True, slots=True, kw_only=True)
class AccelChoice:
    accel: Accel
    reason: str


def probe_kvm(root: Path = Path("/")) -> tuple[bool, str]:
    """Whether KVM can run a guest here, and why (or why not). ``root`` is for tests."""
    dev = root / "dev/kvm"
    if not dev.exists():
        return False, "/dev/kvm does not exist"
    if not os.access(dev, os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    if (root / "sys/module/kvm_pvm").exists():
        return False, "KVM here is kvm_pvm (nested PVM), which cannot boot an unmodified guest"
    try:
        cpuinfo = (root / "proc/cpuinfo").read_text()
    except OSError as exc:
        return False, f"cannot read /proc/cpuinfo: {exc}"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    if not flags & {"vmx", "svm"}:
        return False, "the CPU shows no vmx/svm flag (no hardware virtualisation)"
    return True, "/dev/kvm is usable and the CPU has hardware virtualisation"


def choose_accel(requested: Accel, root: Path = Path("/")) -> AccelChoice:
    """Resolve ``auto``; an explicit choice is kept as the user's word."""
    if requested is not Accel.AUTO:
        return AccelChoice(accel=requested, reason="requested")
    usable, why = probe_kvm(root)
    return AccelChoice(accel=Accel.KVM if usable else Accel.TCG, reason=why)
