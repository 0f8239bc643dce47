"""The README's library example, verbatim (``test_public_api`` keeps the two equal, and
``scripts/check`` type-checks this file under ``mypy --strict``): public names only."""

from pathlib import Path

import anyio

import blockctl
from blockctl import backup, chains, drives, jobs
from blockctl.types import CacheMode, Drive, ImageFormat, MachineConfig


class Progress:
    """A job hook: any object with these methods (see blockctl.jobs.JobHook)."""

    def on_transition(self, transition: jobs.JobTransition) -> None:
        print(f"{transition.job_id}: {transition.status}")

    def on_progress(self, progress: jobs.JobProgress) -> None:
        eta = "?" if progress.eta is None else f"{progress.eta:.0f} s"
        print(f"{progress.job_id}: {progress.done}/{progress.total}, ETA {eta}")


async def main() -> None:
    guest = blockctl.find_guest()
    config = MachineConfig(
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        drives=(Drive(file=Path("disk.qcow2"), format=ImageFormat.QCOW2, cache=CacheMode.NONE),),
    )
    async with blockctl.open_vm(config) as vm:  # QEMU is reaped when this block exits
        if vm.console is not None:
            await vm.console.wait_ready()
            print(await vm.console.check("cat /sys/block/vda/size"))
        extra = await drives.hotplug(vm, Drive(file=Path("extra.qcow2"), format=ImageFormat.RAW))
        snapshot = await chains.external_snapshot(vm, "before-upgrade")
        print(snapshot.overlays)  # device -> the new overlay the guest writes to
        control = jobs.JobControl(speed=50 << 20, hooks=[Progress()])
        await chains.commit(vm, "disk0", control=control)  # merge it back
        repo = backup.init_repository(Path("backups"))
        with anyio.move_on_after(600):  # cancelled: no point recorded, nothing left behind
            control = jobs.JobControl(speed=100 << 20, hooks=[Progress()])
            point = await backup.create(vm, repo, control=control)
            print(point.id, point.kind, point.bytes_read)
        await drives.unplug(vm, extra.device_id)


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
