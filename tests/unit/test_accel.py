"""The accelerator probe, over fake /dev, /sys and /proc trees."""

from __future__ import annotations

from pathlib import Path

from blockctl._accel import choose_accel, probe_kvm
from blockctl.types import Accel


def make_root(
    tmp_path: Path, *, kvm: bool = True, pvm: bool = False, flags: str = "fpu vme vmx sse"
) -> Path:
    (tmp_path / "dev").mkdir()
    (tmp_path / "proc").mkdir()
    if kvm:
        (tmp_path / "dev/kvm").write_text("")
    if pvm:
        (tmp_path / "sys/module/kvm_pvm").mkdir(parents=True)
    (tmp_path / "proc/cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    return tmp_path


def test_real_kvm(tmp_path: Path) -> None:
    assert probe_kvm(make_root(tmp_path))[0]
    assert choose_accel(Accel.AUTO, tmp_path).accel is Accel.KVM


def test_nested_pvm_is_not_usable(tmp_path: Path) -> None:
    usable, why = probe_kvm(make_root(tmp_path, pvm=True))
    assert not usable and "kvm_pvm" in why
    assert choose_accel(Accel.AUTO, tmp_path).accel is Accel.TCG


def test_no_virtualisation_flags(tmp_path: Path) -> None:
    usable, why = probe_kvm(make_root(tmp_path, flags="fpu sse"))
    assert not usable and "vmx/svm" in why


def test_no_device(tmp_path: Path) -> None:
    assert not probe_kvm(make_root(tmp_path, kvm=False))[0]


def test_explicit_choice_is_kept(tmp_path: Path) -> None:
    root = make_root(tmp_path, pvm=True)
    assert choose_accel(Accel.KVM, root).accel is Accel.KVM
    assert choose_accel(Accel.TCG, root).reason == "requested"


def test_this_host() -> None:
    # On the project's machines (nested PVM) auto must pick TCG; elsewhere either is right,
    # but the reason must say why.
    choice = choose_accel(Accel.AUTO)
    assert choice.reason
    if Path("/sys/module/kvm_pvm").exists():
        assert choice.accel is Accel.TCG
