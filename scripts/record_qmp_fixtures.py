"""Record the QMP fixtures under ``fixtures/qmp/`` from a real QEMU (see fixtures/README.md).

Run from the repository root: ``python3 scripts/record_qmp_fixtures.py``. It boots the test
guest with a 3-layer chain (base.raw <- mid.qcow2 <- top.qcow2) plus a copy-on-read drive,
records the graph queries, then runs a backup, a failing backup and an active commit and
records their events and ``query-jobs`` replies. Paths inside the replies are rewritten to
``/fixtures/img/...`` so the fixtures do not depend on where they were recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blockctl
from blockctl._qmp.session import QMPSession
from blockctl.types import CacheMode, Drive, ImageFormat, MachineConfig

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "qmp"
MIB = 1 << 20


def img(*argv: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, argv)], check=True)  # noqa: S603


class Recorder:
    def __init__(self, session: QMPSession, images: Path) -> None:
        self.session = session
        self.images = str(images)

    def scrub(self, value: Any) -> Any:
        text = json.dumps(value).replace(self.images, "/fixtures/img")
        return json.loads(text)

    async def save(self, name: str, command: str, args: dict[str, Any] | None = None) -> Any:
        reply = await self.session.execute(command, args)
        (OUT / name).write_text(json.dumps(self.scrub(reply), indent=1, sort_keys=True) + "\n")
        return reply

    async def job(
        self,
        name: str,
        command: str,
        args: dict[str, Any],
        *,
        complete_on_ready: bool = False,
        sample: str | None = None,
    ) -> None:
        """Run one job, writing every event of its life to events/<name>.jsonl."""
        job_id = args["job-id"]
        lines: list[str] = []
        with self.session.events() as stream, anyio.fail_after(120):
            await self.session.execute(command, args)
            sampled = False
            while True:
                event = await stream.next()
                if event.name in ("SHUTDOWN", "RTC_CHANGE"):
                    continue
                data = dict(event.data)
                lines.append(json.dumps({"event": event.name, "data": self.scrub(data)}))
                status = data.get("status") if event.name == "JOB_STATUS_CHANGE" else None
                if status == "running" and sample and not sampled:
                    sampled = True
                    await self.save(sample, "query-jobs")
                if status == "ready" and complete_on_ready:
                    await self.session.execute("job-complete", {"id": job_id})
                if status == "concluded":
                    await self.save(f"{name}.query-jobs.json", "query-jobs")
                    await self.session.execute("job-dismiss", {"id": job_id})
                if status == "null":
                    break
        (OUT / "events" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


async def main() -> None:
    guest = blockctl.find_guest()
    with tempfile.TemporaryDirectory(prefix="bcfix-") as tmp:
        d = Path(tmp)
        base = d / "base.raw"
        with open(base, "wb") as f:
            f.write(bytes(range(256)) * (4 * MIB // 256))
            f.truncate(32 * MIB)
        img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", d / "mid.qcow2")
        img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2")
        img("create", "-q", "-f", "qcow2", d / "data.qcow2", "16M")
        img("create", "-q", "-f", "qcow2", d / "backup.qcow2", "32M")
        img("create", "-q", "-f", "raw", d / "bad.raw", "32M")
        config = MachineConfig(
            kernel=guest.kernel,
            initrd=guest.initrd,
            append=guest.append,
            drives=(
                Drive(file=d / "top.qcow2", format=ImageFormat.QCOW2, cache=CacheMode.NONE),
                Drive(file=d / "data.qcow2", format=ImageFormat.QCOW2, copy_on_read=True),
            ),
        )
        async with blockctl.open_vm(config) as vm:
            assert vm.console is not None
            await vm.console.wait_ready()
            rec = Recorder(vm.session, d)
            s = vm.session
            await s.execute("block-dirty-bitmap-add", {"node": "drv0", "name": "bm0"})
            await s.execute(
                "block-dirty-bitmap-add", {"node": "drv1", "name": "bm1", "persistent": True}
            )
            for name, options in (
                ("bk-file", {"driver": "file", "filename": str(d / "backup.qcow2")}),
                ("bk", {"driver": "qcow2", "file": "bk-file"}),
            ):
                await s.execute("blockdev-add", {"node-name": name, **options})
            await rec.save(
                "chain3.query-named-block-nodes.json", "query-named-block-nodes", {"flat": True}
            )
            await rec.save("chain3.query-block.json", "query-block")
            await rec.save("chain3.x-debug-query-block-graph.json", "x-debug-query-block-graph")
            await rec.job(
                "backup-ok",
                "blockdev-backup",
                {
                    "job-id": "bc-backup-1",
                    "device": "drv0",
                    "target": "bk",
                    "sync": "full",
                    "auto-dismiss": False,
                    "speed": 16 * MIB,
                },
                sample="query-jobs.running.json",
            )
            bad_nodes: tuple[tuple[str, dict[str, Any]], ...] = (
                ("bad-file", {"driver": "file", "filename": str(d / "bad.raw")}),
                (
                    "bad-dbg",
                    {
                        "driver": "blkdebug",
                        "image": "bad-file",
                        "inject-error": [{"event": "write_aio", "errno": 5}],
                    },
                ),
                ("bad", {"driver": "raw", "file": "bad-dbg"}),
            )
            for name, options in bad_nodes:
                await s.execute("blockdev-add", {"node-name": name, **options})
            await rec.job(
                "backup-eio",
                "blockdev-backup",
                {
                    "job-id": "bc-backup-2",
                    "device": "drv0",
                    "target": "bad",
                    "sync": "full",
                    "auto-dismiss": False,
                },
            )
            # Backing layers are opened read-only; a commit needs its base (and the layers
            # between) writable: reopen them with their full options (as libvirt does).
            layers = {str(n["node-name"]): n for n in vm.drives[0].nodes}
            await s.execute(
                "blockdev-reopen",
                {
                    "options": [
                        {**layers[n], "read-only": False}
                        for n in ("drv0-b2-file", "drv0-b2", "drv0-b1-file", "drv0-b1")
                    ]
                },
            )
            await rec.job(
                "commit-active",
                "block-commit",
                {
                    "job-id": "bc-commit-3",
                    "device": "drv0",
                    "base-node": "drv0-b2",
                    "auto-dismiss": False,
                },
                complete_on_ready=True,
            )
            await rec.save(
                "after-commit.query-named-block-nodes.json",
                "query-named-block-nodes",
                {"flat": True},
            )
            await rec.save("after-commit.query-block.json", "query-block")
            await rec.save(
                "after-commit.x-debug-query-block-graph.json", "x-debug-query-block-graph"
            )
            version = await s.execute("query-version")
            (OUT / "query-version.json").write_text(json.dumps(version, indent=1) + "\n")


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
