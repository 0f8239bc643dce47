"""The test guest: a Debian cloud kernel plus a busybox initramfs, built from Debian packages.

Why this guest: block operations need a *running* guest that reads and writes its disks, and
nothing more. A stock kernel with a busybox initramfs is 15 MB, boots to a shell in about 2 s
even on TCG, needs no disk image of its own and no network, and comes only from packages apt
already trusts (guest.md §1). Everything in it is known, so the serial protocol of
:mod:`blockctl._console` can rely on the exact banner and prompt that ``_data/init`` and
``_data/profile`` produce.

The build runs helpers only through :mod:`blockctl._proc` and needs nothing on the host beyond
apt and dpkg: busybox from the downloaded ``busybox-static`` package does ``depmod`` and
``cpio`` itself. The result lives in one cache directory (:func:`default_guest_dir`); files are
moved into place with ``os.replace`` and ``manifest.json`` is written last, so a directory with
a manifest always holds a complete guest, even after a crash or a cancelled build.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import anyio.to_thread

from blockctl import _fsutil, _proc
from blockctl._log import get_logger
from blockctl.errors import BlockctlError, MissingComponent

__all__ = [
    "AGENT_PACKAGES",
    "APPEND",
    "WANTED_MODULES",
    "GuestImage",
    "build_guest",
    "default_guest_dir",
    "find_guest",
]

#: The kernel command line the guest is built for: the serial console is the shell's terminal,
#: and a panic ends the VM at once (with QEMU's ``-no-reboot``) instead of hanging a test.
#: ``cryptomgr.notests``: the kernel's crypto self-tests took 0.4 s of each TCG boot
#: (``initcall_debug``: crypto_algapi_init 315 ms, crypto_kdf108_init 88 ms), and nothing in
#: the guest uses the kernel's crypto.
APPEND = "console=ttyS0 panic=-1 quiet cryptomgr.notests"

#: The cloud flavour: LZ4-compressed (boots ~3 s faster on TCG than the generic XZ one) and
#: with ext4 built in, so fewer modules to load.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: What the guest must drive: virtio disks and consoles, SCSI disks and CD-ROMs on virtio-scsi
#: or the PIIX IDE controller of the ``pc`` machine, and ISO 9660 media. Dependencies
#: (virtio_ring, scsi_mod, libata, cdrom, ...) are added from modules.dep.
WANTED_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "sr_mod",
    "ata_piix",
    "virtio_console",
    "isofs",
)

#: The guest-agent variant (``build_guest(agent=True)``) adds Debian's qemu-guest-agent and
#: exactly the libraries it links, resolved by the extracted Debian loader (qga.md §1), so the
#: host's own libraries never end up in the guest. bookworm names.
AGENT_PACKAGES: tuple[str, ...] = (
    "qemu-guest-agent",
    "libc6",
    "libglib2.0-0",
    "libpcre2-8-0",
    "libnuma1",
    "libudev1",
    "liburing2",
)
_AGENT_SUFFIX = "-qga"
_AGENT_LIB_DIR = "lib/x86_64-linux-gnu"
_AGENT_LOADER = "ld-linux-x86-64.so.2"
# /init of the agent variant starts the agent in the background, before the shell loop; its
# output goes to a file so that a late line never interleaves with the serial protocol.
_AGENT_INIT_MARK = "# Interactive ash reads $ENV"
_AGENT_INIT_LINES = """\
# The guest-agent variant: start qemu-ga on its virtio-serial port unless told qga=0.
if [ -x /sbin/qga-start ] && ! grep -qw qga=0 /proc/cmdline; then
    /sbin/qga-start 10 >/run/qga-start.log 2>&1 &
fi

"""
_KERNEL_FILE = "vmlinuz"
_INITRD_FILE = "initramfs.gz"
_MANIFEST_FILE = "manifest.json"
_LOCK_FILE = ".lock"
_TMP_PREFIX = ".tmp-"
# Bump when the layout of the guest changes in a way an old cached build would not match.
# 2: modules without their signatures (:func:`_strip_module_signature`).
_FORMAT = 2
_MISSING_WHAT = "the test guest"
_MISSING_HINT = "run `blockctl guest build` (or scripts/build-guest)"
# Every file in the initramfs gets this mtime, and cpio renumbers inodes and drops device
# numbers, so the same packages always give the same initramfs bytes.
_FIXED_MTIME = 0
# `find . | cpio -o -H newc`, with NUL-separated names, root-owned entries even when built by a
# user, and inode and device numbers that do not depend on the build host.
_CPIO_CREATE = (
    *("cpio", "-o", "-H", "newc", "-0"),
    *("-R", "0:0"),
    *("--renumber-inodes", "--ignore-devno"),
)
_ROOT_DIRS = ("bin", "dev", "etc", "lib", "mnt", "proc", "run", "sys", "tmp", "usr")
_LOCK_POLL_SECONDS = 0.2
_CLEANUP_ATTEMPTS = 20
_CLEANUP_RETRY_SECONDS = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestImage:
    """A complete built guest: what ``-kernel``, ``-initrd`` and ``-append`` need."""

    kernel: Path
    initrd: Path
    append: str
    kernel_version: str
    #: Whether the initramfs carries qemu-ga (started on ``org.qemu.guest_agent.0``).
    agent: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class _Package:
    """A downloaded .deb and the name and version dpkg reads from it (for the manifest)."""

    name: str
    version: str
    deb: Path


def default_guest_dir(*, agent: bool = False) -> Path:
    """Where the guest is cached: ``$BLOCKCTL_GUEST_DIR``, else the XDG cache directory.

    A cache, not data: it can always be rebuilt from packages, so it belongs under
    ``$XDG_CACHE_HOME`` (``~/.cache`` when unset or not absolute, as the XDG spec says).
    The guest-agent variant lives beside it (``guest-qga``), so the default guest stays small
    and fast to boot.
    """
    explicit = os.environ.get("BLOCKCTL_GUEST_DIR")
    if explicit:
        base = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
        base = cache / "blockctl" / "guest"
    return base.with_name(base.name + _AGENT_SUFFIX) if agent else base


def _resolve_dir(directory: Path | None, agent: bool = False) -> Path:
    # Absolute, because QEMU may be started with another working directory.
    chosen = default_guest_dir(agent=agent) if directory is None else directory
    return chosen.expanduser().absolute()


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / _MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        return None
    if not isinstance(data.get("kernel_version"), str):
        return None
    return data


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def find_guest(directory: Path | None = None, *, agent: bool = False) -> GuestImage:
    """The guest cached in ``directory`` (default: :func:`default_guest_dir`).

    Complete means: a readable ``manifest.json`` of this format plus non-empty kernel and
    initramfs. The manifest is written last, so its presence proves the files beside it are
    whole. ``agent``: the variant with qemu-ga (``build_guest(agent=True)``).

    :raise MissingComponent: no complete guest there (or it lacks the agent).
    """
    where = _resolve_dir(directory, agent)
    manifest = _read_manifest(where)
    if agent and manifest is not None and manifest.get("agent") is not True:
        manifest = None
    kernel = where / _KERNEL_FILE
    initrd = where / _INITRD_FILE
    if manifest is None or not _nonempty_file(kernel) or not _nonempty_file(initrd):
        get_logger().debug(
            "blockctl.guest.not_found",
            directory=str(where),
            manifest=manifest is not None,
            kernel=_nonempty_file(kernel),
            initrd=_nonempty_file(initrd),
        )
        if agent:
            raise MissingComponent(
                "the test guest with the guest agent",
                "run `blockctl guest build --agent` (or scripts/build-guest --agent)",
            )
        raise MissingComponent(_MISSING_WHAT, _MISSING_HINT)
    append = manifest.get("append")
    return GuestImage(
        kernel=kernel,
        initrd=initrd,
        append=append if isinstance(append, str) else APPEND,
        kernel_version=manifest["kernel_version"],
        agent=manifest.get("agent") is True,
    )


def _data_file(name: str) -> bytes:
    return resources.files("blockctl").joinpath("_data").joinpath(name).read_bytes()


def _recipe_digest(agent: bool = False) -> str:
    """A digest of everything in this package that shapes the guest.

    Stored in the manifest so that a cached guest built from an older /init or module list is
    rebuilt instead of silently reused. The agent's parts count only for the agent variant:
    the default guest's digest (and cache) is the same as before the variant existed.
    """
    digest = hashlib.sha256()
    parts = [str(_FORMAT), KERNEL_META_PACKAGE, BUSYBOX_PACKAGE, APPEND, *WANTED_MODULES]
    if agent:
        parts += ["agent", *AGENT_PACKAGES, _AGENT_INIT_LINES]
    for part in parts:
        digest.update(part.encode() + b"\0")
    for name in ("init", "profile", *(("qga-start",) if agent else ())):
        digest.update(_data_file(name) + b"\0")
    return digest.hexdigest()


async def build_guest(
    directory: Path | None = None, *, force: bool = False, agent: bool = False
) -> GuestImage:
    """Build the guest into ``directory`` (default: :func:`default_guest_dir`) and return it.

    Cached: a complete guest built from the current recipe is returned as it is, without
    running anything, unless ``force``. Concurrent builds into one directory are serialised
    by a lock file; the second one then finds the first one's result. ``agent``: the variant
    with qemu-ga (its own directory by default, ``guest-qga``; about +2.7 MB of initramfs).

    :raise MissingComponent: apt does not know the kernel package (run ``apt-get update``), a
        wanted module is not in it, or apt/dpkg are not installed.
    :raise ProcessFailed: a helper (apt-get, dpkg-deb, busybox) failed.
    """
    where = _resolve_dir(directory, agent)
    if not force:
        cached = _cached(where, agent)
        if cached is not None:
            return cached
    log = get_logger(directory=str(where))
    where.mkdir(parents=True, exist_ok=True)
    async with _locked(where, log):
        if not force:
            # Another process may have finished the same build while we waited for the lock.
            cached = _cached(where, agent)
            if cached is not None:
                return cached
        _remove_stale_work_dirs(where, log)
        work = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=where))
        try:
            await _build_in(where, work, log, agent=agent)
        finally:
            with anyio.CancelScope(shield=True):
                await _remove_work_dir(work, log)
    return find_guest(where, agent=agent)


def _cached(where: Path, agent: bool = False) -> GuestImage | None:
    try:
        image = find_guest(where, agent=agent)
    except MissingComponent:
        return None
    manifest = _read_manifest(where)
    if manifest is None or manifest.get("recipe") != _recipe_digest(agent):
        get_logger().info("blockctl.guest.stale", directory=str(where))
        return None
    return image


@contextlib.asynccontextmanager
async def _locked(where: Path, log: Any) -> AsyncIterator[None]:
    """Hold an exclusive flock on ``where/.lock``, polling so that cancellation still works."""
    async with _fsutil.flocked_polling(
        where / _LOCK_FILE,
        poll=_LOCK_POLL_SECONDS,
        create=True,
        on_wait=lambda: log.info("blockctl.guest.waiting_for_lock"),
    ):
        yield


def _remove_stale_work_dirs(where: Path, log: Any) -> None:
    # Under the lock no other build is running here, so any work directory is a crash's leftover.
    for stale in where.glob(_TMP_PREFIX + "*"):
        log.info("blockctl.guest.removing_stale", path=str(stale))
        shutil.rmtree(stale, ignore_errors=True)


async def _remove_work_dir(work: Path, log: Any) -> None:
    """Delete the work directory, retrying briefly.

    A cancelled ``dpkg-deb -x`` is killed, but the tar it forked can go on writing files for a
    moment, so one rmtree may leave a directory behind. What still remains after the retries
    is removed by the next build (:func:`_remove_stale_work_dirs`).
    """
    if not await anyio.to_thread.run_sync(_rmtree_patiently, work):
        log.warning("blockctl.guest.work_dir_left", path=str(work))


def _rmtree_patiently(path: Path) -> bool:
    for _ in range(_CLEANUP_ATTEMPTS):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return True
        time.sleep(_CLEANUP_RETRY_SECONDS)
    return False


class _Steps:
    """Times each build step and logs it as ``blockctl.guest.build_step``."""

    def __init__(self, log: Any) -> None:
        self._log = log

    @contextlib.contextmanager
    def step(self, name: str, **fields: Any) -> Iterator[None]:
        started = time.monotonic()
        yield
        self._log.info(
            "blockctl.guest.build_step",
            step=name,
            seconds=round(time.monotonic() - started, 3),
            **fields,
        )


async def _build_in(where: Path, work: Path, log: Any, *, agent: bool = False) -> None:
    started = time.monotonic()
    steps = _Steps(log)
    debs, extract, root = work / "debs", work / "extract", work / "root"
    for path in (debs, extract, root):
        path.mkdir()

    with steps.step("resolve"):
        kernel_package = await _resolve_kernel_package()
    with steps.step("download", packages=[kernel_package, BUSYBOX_PACKAGE]):
        packages = await _download([kernel_package, BUSYBOX_PACKAGE], debs)
    with steps.step("extract"):
        for package in packages.values():
            await _proc.run(["dpkg-deb", "-x", str(package.deb), str(extract)])
    kernel_package_info = packages[kernel_package]
    busybox = extract / "bin" / "busybox"
    if not busybox.is_file():
        raise BlockctlError(f"{BUSYBOX_PACKAGE} did not contain bin/busybox")
    kver, modules_base = _find_kernel_tree(extract, kernel_package)
    vmlinuz = extract / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.is_file():
        raise BlockctlError(f"{kernel_package} did not contain boot/vmlinuz-{kver}")

    with steps.step("modules"):
        order, builtin = await _select_modules(busybox, modules_base, kver, kernel_package)
    with steps.step("root", modules=len(order)):
        applets = (await _proc.run([str(busybox), "--list"])).stdout.split()
        await anyio.to_thread.run_sync(
            functools.partial(
                _populate_root,
                root,
                busybox=busybox,
                applets=applets,
                modules_src=modules_base / "lib" / "modules" / kver,
                kver=kver,
                modules=order,
            )
        )
        # The package ships no modules.dep (its postinst runs depmod); generate one for the
        # trimmed tree so that `modprobe` works inside the guest too.
        await _proc.run([str(busybox), "depmod", "-b", str(root), kver])
    agent_versions: dict[str, str] = {}
    if agent:
        with steps.step("agent", packages=list(AGENT_PACKAGES)):
            agent_versions = await _add_agent(root, work / "qga")
    await anyio.to_thread.run_sync(_fix_mtimes, root)
    with steps.step("initramfs"):
        initramfs = work / _INITRD_FILE
        archive = await _proc.run_bytes(
            [str(busybox), *_CPIO_CREATE],
            stdin=b"\0".join(entry.encode() for entry in _cpio_entries(root)),
            cwd=root,
        )
        compressed = await anyio.to_thread.run_sync(
            functools.partial(gzip.compress, archive, compresslevel=6, mtime=0)
        )
        initramfs.write_bytes(compressed)

    manifest = {
        "format": _FORMAT,
        "recipe": _recipe_digest(agent),
        "kernel_package": kernel_package_info.name,
        "kernel_package_version": kernel_package_info.version,
        "kernel_version": kver,
        "busybox_package": packages[BUSYBOX_PACKAGE].name,
        "busybox_version": packages[BUSYBOX_PACKAGE].version,
        "append": APPEND,
        "modules": order,
        "builtin_modules_skipped": builtin,
        "kernel_bytes": vmlinuz.stat().st_size,
        "initrd_bytes": len(compressed),
        "initrd_uncompressed_bytes": len(archive),
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 2),
    }
    if agent:
        manifest["agent"] = True
        manifest["agent_packages"] = agent_versions
    with steps.step("install"):
        await anyio.to_thread.run_sync(
            functools.partial(
                _install, where, work, kernel=vmlinuz, initrd=initramfs, manifest=manifest
            )
        )
    log.info(
        "blockctl.guest.built",
        kernel_package=kernel_package_info.name,
        kernel_package_version=kernel_package_info.version,
        kernel_bytes=manifest["kernel_bytes"],
        initrd_bytes=len(compressed),
        seconds=manifest["build_seconds"],
    )


async def _add_agent(root: Path, work: Path) -> dict[str, str]:
    """Put qemu-ga, its libraries, the Debian loader and ``/sbin/qga-start`` into ``root``.

    The libraries come from the downloaded packages and are resolved by the *extracted*
    loader (``ld.so --list``): never the host's (Debian's ``/lib64/ld-linux…`` is an absolute
    symlink to the host's file, so only the file under ``lib/x86_64-linux-gnu`` is used).
    Returns the package versions for the manifest.
    """
    debs, extract = work / "debs", work / "extract"
    debs.mkdir(parents=True)
    extract.mkdir()
    packages = await _download(AGENT_PACKAGES, debs)
    for package in packages.values():
        await _proc.run(["dpkg-deb", "-x", str(package.deb), str(extract)])
    binary = extract / "usr" / "sbin" / "qemu-ga"
    loader = extract / _AGENT_LIB_DIR / _AGENT_LOADER
    for path in (binary, loader):
        if not path.is_file():
            raise BlockctlError(f"the agent packages did not contain {path.relative_to(extract)}")
    search = f"{extract / _AGENT_LIB_DIR}:{extract / 'usr' / _AGENT_LIB_DIR}"
    listing = await _proc.run([str(loader), "--library-path", search, "--list", str(binary)])
    libraries = parse_loader_list(listing.stdout)
    await anyio.to_thread.run_sync(
        functools.partial(
            _populate_agent, root, extract=extract, binary=binary, loader=loader, libs=libraries
        )
    )
    get_logger().debug("blockctl.guest.agent_libraries", libraries=sorted(libraries))
    return {p.name: p.version for p in packages.values()}


def parse_loader_list(text: str) -> dict[str, Path]:
    """``ld.so --list`` output as ``{soname: resolved path}`` (the vdso and loader lines,
    which have no ``=>``, are left out).

    :raise MissingComponent: a library was ``not found``.
    """
    found: dict[str, Path] = {}
    for line in text.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        # The loader's own line ("/lib64/ld-linux-x86-64.so.2 => …") names a path, not a
        # soname: it is copied separately, and a path here must never become a destination.
        if not arrow or "/" in name or not name:
            continue
        target = rest.rsplit(" (", 1)[0].strip()
        if target == "not found" or not target:
            raise MissingComponent(
                f"library {name} for qemu-ga",
                "no agent package ships it; add its package to AGENT_PACKAGES",
            )
        found[name] = Path(target)
    return found


def _populate_agent(
    root: Path, *, extract: Path, binary: Path, loader: Path, libs: Mapping[str, Path]
) -> None:
    lib_dir = root / _AGENT_LIB_DIR
    lib_dir.mkdir(parents=True, exist_ok=True)
    for soname, path in libs.items():
        destination = lib_dir / soname
        if "/" in soname or destination.parent != lib_dir:
            raise BlockctlError(f"refusing library name {soname!r}: not a plain soname")
        real = path.resolve()
        if not real.is_relative_to(extract.resolve()):
            raise BlockctlError(f"{soname} resolved to {real}, outside the agent packages")
        # Regular files under their sonames: Debian's loader searches this directory itself.
        shutil.copyfile(real, destination)
    (root / "lib64").mkdir(exist_ok=True)
    shutil.copyfile(loader.resolve(), root / "lib64" / _AGENT_LOADER)
    (root / "lib64" / _AGENT_LOADER).chmod(0o755)
    # /usr/sbin is a link to /bin in this initramfs: /usr/sbin/qemu-ga works too.
    shutil.copyfile(binary, root / "bin" / "qemu-ga")
    (root / "bin" / "qemu-ga").chmod(0o755)
    (root / "bin" / "qga-start").write_bytes(_data_file("qga-start"))
    (root / "bin" / "qga-start").chmod(0o755)
    # qemu-ga's state dir is /var/run (qga.state, qga.state.isfrozen while frozen).
    (root / "var").mkdir(exist_ok=True)
    (root / "var" / "run").symlink_to("../run")
    init = _data_file("init").decode()
    if _AGENT_INIT_MARK not in init:
        raise BlockctlError("_data/init changed: the agent start line has no place to go")
    (root / "init").write_text(init.replace(_AGENT_INIT_MARK, _AGENT_INIT_LINES + _AGENT_INIT_MARK))
    (root / "init").chmod(0o755)


async def _resolve_kernel_package() -> str:
    """The versioned kernel package the meta package currently points to."""
    done = await _proc.run(["apt-cache", "depends", KERNEL_META_PACKAGE], check=False)
    for line in done.stdout.splitlines():
        # "  Depends: linux-image-6.1.0-56-cloud-amd64"; "|Depends:" marks an alternative and
        # "<name>" a virtual package.
        key, _, value = line.strip().lstrip("|").partition(":")
        if key == "Depends" and value.strip():
            return value.strip().strip("<>")
    raise MissingComponent(
        f"the Debian package {KERNEL_META_PACKAGE}",
        "apt does not know it; run `apt-get update` (as root) and build again",
    )


def _parse_control_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "\t")):
            fields[key.strip()] = value.strip()
    return fields


async def _download(names: Sequence[str], dest: Path) -> dict[str, _Package]:
    """``apt-get download`` the packages into ``dest``; map each name to its .deb.

    The .deb file names are URL-escaped (``1%3a1.35.0``), so each file's own control fields
    say which package and version it is.
    """
    # As root apt warns on stderr that _apt cannot access dest ("unsandboxed"): harmless.
    await _proc.run(["apt-get", "download", *names], cwd=dest)
    found: dict[str, _Package] = {}
    debs = await anyio.to_thread.run_sync(lambda: sorted(dest.glob("*.deb")))
    for deb in debs:
        fields = _parse_control_fields(
            (await _proc.run(["dpkg-deb", "--field", str(deb), "Package", "Version"])).stdout
        )
        if "Package" in fields and "Version" in fields:
            found[fields["Package"]] = _Package(
                name=fields["Package"], version=fields["Version"], deb=deb
            )
    missing = [name for name in names if name not in found]
    if missing:
        raise BlockctlError(f"apt-get download did not produce a .deb for: {', '.join(missing)}")
    return found


def _find_kernel_tree(extract: Path, kernel_package: str) -> tuple[str, Path]:
    """The kernel version and the base directory that holds ``lib/modules/<kver>``.

    Bookworm packages ship ``/lib/modules``; merged-/usr packages (trixie on) ship
    ``/usr/lib/modules``. busybox depmod wants the base that contains ``lib/modules``.
    """
    for base in (extract, extract / "usr"):
        modules = base / "lib" / "modules"
        if modules.is_dir():
            versions = sorted(p.name for p in modules.iterdir() if p.is_dir())
            if len(versions) == 1:
                return versions[0], base
            raise BlockctlError(
                f"{kernel_package} holds {len(versions)} module trees ({versions}), expected one"
            )
    raise BlockctlError(f"{kernel_package} has no lib/modules directory")


def module_name(path: str) -> str:
    """The kernel's name for a module file: ``kernel/lib/crc-t10dif.ko`` → ``crc_t10dif``."""
    return PurePosixPath(path).name.partition(".ko")[0].replace("-", "_")


def parse_modules_dep(text: str, kver: str) -> dict[str, tuple[str, ...]]:
    """modules.dep as ``{module path: dependency paths}``, paths relative to the tree."""
    prefix = f"/lib/modules/{kver}/"

    def relative(path: str) -> str:
        return path.removeprefix(prefix).lstrip("/")

    deps: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        module, _, rest = line.partition(":")
        deps[relative(module.strip())] = tuple(relative(dep) for dep in rest.split())
    return deps


def load_order(
    wanted: Iterable[str], deps: Mapping[str, Sequence[str]], builtin: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """The insmod order for ``wanted`` modules: depth-first, dependencies first, each once.

    insmod (unlike modprobe) loads exactly one file and fails on unresolved symbols, so every
    module must come after everything it needs. Returns ``(module paths in load order, wanted
    names skipped because they are built into the kernel)``.

    :raise MissingComponent: a wanted module is neither a module file nor built in.
    """
    by_name = {module_name(path): path for path in deps}
    builtin_names = {module_name(path) for path in builtin}
    order: list[str] = []
    done: set[str] = set()
    skipped: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in done:
            return
        if path in stack:
            raise BlockctlError(f"modules.dep has a cycle: {' -> '.join((*stack, path))}")
        for dep in deps.get(path, ()):
            visit(dep, (*stack, path))
        done.add(path)
        order.append(path)

    for name in wanted:
        key = module_name(name)
        if key in by_name:
            visit(by_name[key], ())
        elif key in builtin_names:
            skipped.append(name)
        else:
            raise MissingComponent(
                f"kernel module {name}",
                "the kernel package ships it neither as a module nor built in; "
                "use a kernel flavour that has it or drop it from WANTED_MODULES",
            )
    return order, skipped


async def _select_modules(
    busybox: Path, modules_base: Path, kver: str, kernel_package: str
) -> tuple[list[str], list[str]]:
    tree = modules_base / "lib" / "modules" / kver
    # Dependencies come from a modules.dep of the *full* tree; the trimmed tree gets its own.
    await _proc.run([str(busybox), "depmod", "-b", str(modules_base), kver])
    deps = parse_modules_dep((tree / "modules.dep").read_text(), kver)
    builtin_file = tree / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.is_file() else []
    order, skipped = load_order(WANTED_MODULES, deps, builtin)
    get_logger().debug(
        "blockctl.guest.modules", kernel_package=kernel_package, order=order, builtin=skipped
    )
    return order, skipped


def _populate_root(
    root: Path,
    *,
    busybox: Path,
    applets: Sequence[str],
    modules_src: Path,
    kver: str,
    modules: Sequence[str],
) -> None:
    """Lay out the initramfs tree: busybox and its applet links, /init, /etc and modules."""
    for name in _ROOT_DIRS:
        (root / name).mkdir()
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in sorted(set(applets)):
        if applet and "/" not in applet and applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    # One directory for every applet: /sbin/..., /usr/bin/... and /usr/sbin/... paths still work.
    (root / "sbin").symlink_to("bin")
    (root / "usr" / "bin").symlink_to("../bin")
    (root / "usr" / "sbin").symlink_to("../bin")

    (root / "init").write_bytes(_data_file("init"))
    (root / "init").chmod(0o755)
    (root / "etc" / "profile").write_bytes(_data_file("profile"))
    (root / "etc" / "modules.load").write_text("".join(f"{path}\n" for path in modules))

    tree = root / "lib" / "modules" / kver
    for path in modules:
        target = tree / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_strip_module_signature((modules_src / path).read_bytes()))
    # Lets busybox modprobe treat built-in modules (ext4 on cloud) as present.
    if (modules_src / "modules.builtin").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules_src / "modules.builtin", tree / "modules.builtin")


#: The end of a module file with an appended signature (the kernel's ``MODULE_SIG_STRING``).
_MODULE_SIG_MARKER = b"~Module signature appended~\n"


def _strip_module_signature(module: bytes) -> bytes:
    """``module`` without its appended signature, as ``strip`` would leave it.

    Why: on TCG, checking a module's signature is emulated RSA and hashing; the 11-16
    modules' checks took 0.25 s of CPU per boot (QEMU's CPU time to the shell: 1.73 s with
    them, 1.48 s without). Debian's kernel does not enforce signatures (no
    ``module.sig_enforce``, no lockdown without Secure Boot), so an unsigned module loads and
    taints the kernel, which nothing here reads. The trailer is ``struct module_signature``
    (12 bytes: algorithm, hash, id type, signer length, key id length, 3 pad bytes,
    big-endian signature length) between the signature and the marker."""
    if not module.endswith(_MODULE_SIG_MARKER):
        return module
    end = len(module) - len(_MODULE_SIG_MARKER)
    info = module[end - 12 : end]
    if len(info) < 12:
        return module
    signer_len, key_id_len = info[3], info[4]
    sig_len = int.from_bytes(info[8:12], "big")
    start = end - 12 - sig_len - signer_len - key_id_len
    if start < 0:
        raise BlockctlError(f"a module's signature trailer is malformed (length {sig_len})")
    return module[:start]


def _fix_mtimes(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.utime(
                os.path.join(dirpath, name), (_FIXED_MTIME, _FIXED_MTIME), follow_symlinks=False
            )
    os.utime(root, (_FIXED_MTIME, _FIXED_MTIME))


def _cpio_entries(root: Path) -> list[str]:
    """What ``cd root && find .`` would list, sorted, parents before their contents.

    os.walk puts symlinks to directories (``sbin``) among the directories and does not descend
    into them, which is what the archive wants: the link itself.
    """
    entries = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        entries.extend(f"./{rel / name}" for name in sorted((*dirnames, *filenames)))
    return entries


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(
    where: Path, work: Path, *, kernel: Path, initrd: Path, manifest: Mapping[str, Any]
) -> None:
    """Move the files into place, manifest last, so a manifest always means "complete"."""
    staged_manifest = work / _MANIFEST_FILE
    staged_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    for path in (kernel, initrd, staged_manifest):
        _fsync(path)
    # Without a manifest the directory counts as incomplete while the files are swapped.
    with contextlib.suppress(FileNotFoundError):
        (where / _MANIFEST_FILE).unlink()
    os.replace(kernel, where / _KERNEL_FILE)
    os.replace(initrd, where / _INITRD_FILE)
    os.replace(staged_manifest, where / _MANIFEST_FILE)
    _fsync(where)


def _configure_logging(verbose: bool) -> None:
    # Only for running this module as a program; as a library blockctl never configures
    # structlog. Events go to stderr so that stdout carries just the result.
    import structlog

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blockctl._guest",
        description="Build (or find, when cached) the blockctl test guest from Debian packages.",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even when a complete guest is cached"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"guest directory (default: $BLOCKCTL_GUEST_DIR or {default_guest_dir()})",
    )
    parser.add_argument(
        "--agent", action="store_true", help="the variant with qemu-ga (guest-qga directory)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug events too")
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        image = anyio.run(
            functools.partial(build_guest, args.dir, force=args.force, agent=args.agent),
            backend="asyncio",
        )
    except BlockctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel:         {image.kernel}")
    print(f"initrd:         {image.initrd}")
    print(f"append:         {image.append}")
    print(f"kernel_version: {image.kernel_version}")
    print(f"agent:          {image.agent}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
