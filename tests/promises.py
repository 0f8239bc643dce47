"""The promise ledger: each promise the README makes, the tests that enforce it, and at least one
mutation of blockctl that breaks it (issue 22, part 1).

A :class:`Mutation` is a small textual patch to one file under ``blockctl/``: ``find`` must occur
exactly once in that file and is replaced by ``replace``. ``scripts/mutants`` applies each one in
a scratch copy of the tree and runs only its promise's tests, which must then FAIL (the mutant is
killed). ``tests/unit/test_promises.py`` checks the ledger itself without running QEMU: every
quote is in its README section, every test node id exists, every ``find`` occurs exactly once,
every promise section is covered, and the README's ledger table is this ledger.

The mutations are the ones a careless refactor would plausibly make: a dropped clean-up call, a
condition that forgets a case, a shield removed, a check moved after the fact.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Mutation:
    """Replace the one occurrence of ``find`` in ``file`` (a path under ``blockctl/``)."""

    file: str
    find: str
    replace: str
    #: What the mutant does, in a few words (the README table shows it).
    what: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Promise:
    id: str
    #: The README heading (without ``#``) whose section holds ``quote``.
    section: str
    #: Words of the README (whitespace-insensitive) that make the promise.
    quote: str
    #: pytest node ids, relative to the repository root; the fast ones that enforce it.
    tests: tuple[str, ...]
    mutations: tuple[Mutation, ...]


#: The README sections whose promises the ledger must cover (each: at least one promise).
SECTIONS = (
    "The command line",
    "VMs started by other tools",
    "The library",
    "Many clients, one VM",
    "Drives of a running guest",
    "Snapshots, chains and jobs",
    "Backups",
    "Guest agent",
    "Reliability",
    "Crash recovery",
    "Untrusted images",
    "Private by construction",
    "Fleet",
)

U = "tests/unit/"
I = "tests/integration/"  # noqa: E741

PROMISES: tuple[Promise, ...] = (
    # Section: The command line, VMs started by other tools, The library
    Promise(
        id="cli-closed-pipe-is-quiet",
        section="The command line",
        quote="A closed pipe (`blockctl qmp VM query-qmp-schema | head`) ends the command quietly",
        tests=(U + "test_cli_grammar.py::test_a_closed_pipe_is_quiet",),
        mutations=(
            Mutation(
                file="blockctl/_cli/main.py",
                find="        return ExitCode.BROKEN_PIPE",
                replace="        raise",
                what="a closed pipe ends in a traceback",
            ),
        ),
    ),
    Promise(
        id="cli-usage-errors-in-json",
        section="The command line",
        quote='2    usage error (with --json also {"error": ...} on stdout)',
        tests=(U + "test_cli_grammar.py::test_usage_errors_exit_2_with_json_under_json",),
        mutations=(
            Mutation(
                file="blockctl/_cli/main.py",
                find='        if "--json" in _Parser.argv:',
                replace="        if False:",
                what="usage errors print no JSON under --json",
            ),
        ),
    ),
    Promise(
        id="foreign-vm-identity-not-a-path",
        section="VMs started by other tools",
        quote="identified by the name QEMU was started with (`-name`), or by `--vm-name NAME`",
        tests=(I + "test_foreign_vm.py::test_a_qemu_started_with_drive_options",),
        mutations=(
            Mutation(
                file="blockctl/_machine.py",
                find="            identity = vm_name or await wire.query_name(session)",
                replace="            identity = vm_name",
                what="QEMU's -name is ignored: the VM is named by its socket path",
            ),
            Mutation(
                file="blockctl/_qmp/models.py",
                find="        return self.device or path",
                replace="        return path",
                what="a -drive disk is listed by its QOM path, not its block backend's name",
            ),
        ),
    ),
    Promise(
        id="library-silent-unless-configured",
        section="The library",
        quote="The library prints nothing until the application configures structlog",
        tests=(
            I + "test_library.py::test_the_library_prints_nothing_unless_logging_is_configured",
        ),
        mutations=(
            Mutation(
                file="blockctl/_log.py",
                find='    structlog = sys.modules.get("structlog")\n'
                "    if structlog is not None and structlog.is_configured():\n",
                replace="    import structlog\n\n    if True:\n",
                what="an unconfigured structlog prints every event to stdout",
            ),
        ),
    ),
    Promise(
        id="library-trio-refused",
        section="The library",
        quote="Under trio, `open_vm`, `attach` and `launch_detached` refuse at once",
        tests=(
            U + "test_public_api.py::test_trio_is_refused_at_the_entry_points_with_the_way_out",
        ),
        mutations=(
            Mutation(
                file="blockctl/_machine.py",
                find='    require_asyncio("open_vm")',
                replace="    pass",
                what="open_vm under trio fails deep inside instead",
            ),
        ),
    ),
    # Section: Many clients, one VM
    Promise(
        id="clients-pool-busy-names-holders",
        section="Many clients, one VM",
        quote="When all are taken it retries until its timeout, then fails with "
        "`MonitorsBusy` naming each holder",
        tests=(U + "test_clients.py::test_take_waits_then_fails_naming_the_holders",),
        mutations=(
            Mutation(
                file="blockctl/_monitors.py",
                find="    taken = [h.describe() for h in holders(sockets)]",
                replace="    taken: list[str] = []",
                what="MonitorsBusy no longer names the holders",
            ),
        ),
    ),
    Promise(
        id="clients-cancel-by-other-exit-3",
        section="Many clients, one VM",
        quote="a cancel ends it with `JobCancelledByOther`",
        tests=(U + "test_clients.py::test_a_job_cancelled_by_another_client_says_so",),
        mutations=(
            Mutation(
                file="blockctl/errors.py",
                find="    exit_code = 3",
                replace="    exit_code = 1",
                what="a job cancelled by another client exits 1, not 3",
            ),
        ),
    ),
    Promise(
        id="clients-backup-paused-by-other",
        section="Many clients, one VM",
        quote="`pause` holds every next read (the fleecing job keeps the point in time)",
        tests=(U + "test_backup_control.py::test_a_paused_copy_reads_nothing_until_resumed",),
        mutations=(
            Mutation(
                file="blockctl/_backup/control.py",
                find="                if self.paused or self.error_pause is not None:\n"
                "                    self._cond.wait()",
                replace="                if self.error_pause is not None:\n"
                "                    self._cond.wait()",
                what="a paused backup's readers go on reading",
            ),
        ),
    ),
    Promise(
        id="clients-backup-enospc-pauses",
        section="Many clients, one VM",
        quote="a full repository pauses the copy instead of failing it",
        tests=(
            U + "test_backup_control.py::"
            "test_a_full_repository_pauses_until_resumed_under_enospc_only",
            I + "test_clients.py::"
            "test_a_backup_paused_on_a_full_repository_is_resumed_from_a_second_shell",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/reader.py",
                find="                    or not self.control.pause_on_error(cause, self._stop)",
                replace="                    or True",
                what="a full repository fails the backup under --on-error enospc",
            ),
        ),
    ),
    Promise(
        id="clients-backup-cancel-by-other",
        section="Many clients, one VM",
        quote="a cancel ends the backup with `JobCancelledByOther`",
        tests=(
            I + "test_clients.py::test_a_backup_of_one_process_driven_and_cancelled_by_another",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="tg.start_soon(control_ops.watch_cancel, control, jobs[0].id)",
                replace="tg.start_soon(anyio.sleep_forever)",
                what="a backup ignores another client's cancel",
            ),
        ),
    ),
    Promise(
        id="clients-dismiss-only-when-alone",
        section="Many clients, one VM",
        quote="A concluded job is dismissed by `jobs` only when no other client is attached",
        tests=(
            U + "test_clients.py::test_adopt_without_dismiss_leaves_concluded_jobs_to_their_owner",
        ),
        mutations=(
            Mutation(
                file="blockctl/_jobs.py",
                find="        if info.status is JobStatus.CONCLUDED and dismiss:",
                replace="        if info.status is JobStatus.CONCLUDED:",
                what="adopt_jobs dismisses concluded jobs even with dismiss=False",
            ),
        ),
    ),
    Promise(
        id="clients-share-the-drive-records",
        section="Many clients, one VM",
        quote="a disk one client hot-plugged can be unplugged, snapshotted or committed by any "
        "other",
        tests=(I + "test_clients_stateful.py::test_two_clients_random_operations",),
        mutations=(
            Mutation(
                file="blockctl/_registry.py",
                find="        if raw == self._raw:",
                replace="        if self._raw is not None or raw == self._raw:",
                what="a client reads the drive records once: disks hot-plugged by another "
                "client later stay unknown to it",
            ),
        ),
    ),
    # Section: Drives of a running guest
    Promise(
        id="drives-hotplug-rollback",
        section="Drives of a running guest",
        quote="Any failure midway removes what was added: no node or device leaks.",
        tests=(I + "test_hotplug.py::test_failed_device_add_rolls_back",),
        mutations=(
            Mutation(
                file="blockctl/_ops/drives.py",
                find="    await delete_nodes(vm, nodes, event=",
                replace="    await delete_nodes(vm, nodes[:0], event=",
                what="a failed hot-plug keeps the nodes it added",
            ),
        ),
    ),
    Promise(
        id="drives-unplug-waits-for-event",
        section="Drives of a running guest",
        quote="`blockdev-del` is never sent before that event.",
        tests=(I + "test_hotplug.py::test_unplug_pending_when_the_guest_never_releases",),
        mutations=(
            Mutation(
                file="blockctl/_ops/drives.py",
                find="            await events.wait_for("
                "lambda e: wire.is_device_deleted(e, device_id))",
                replace="            pass",
                what="unplug sends blockdev-del without waiting for DEVICE_DELETED",
            ),
        ),
    ),
    Promise(
        id="drives-virtio-backend-event-ignored",
        section="Drives of a running guest",
        quote="(virtio sends one for its backend first, which does not count)",
        tests=(U + "test_drives_logic.py::test_only_the_device_event_counts_as_deleted",),
        mutations=(
            Mutation(
                file="blockctl/_qmp/wire.py",
                find='        or event.data.get("path") == f"/machine/peripheral/{device_id}"',
                replace='        or str(event.data.get("path"))'
                '.startswith(f"/machine/peripheral/{device_id}")',
                what="the virtio backend's DEVICE_DELETED counts as the device's",
            ),
        ),
    ),
    Promise(
        id="drives-reopen-complete-options",
        section="Drives of a running guest",
        quote="sent with each node's *complete* option set (omitted options would reset to "
        "defaults",
        tests=(I + "test_hotplug.py::test_live_cache_resize_and_throttle",),
        mutations=(
            Mutation(
                file="blockctl/_ops/drives.py",
                find='    nodes = tuple({**n, "cache": new_cache} if "cache" in n else n for n in '
                "record.nodes)",
                replace="    nodes = tuple({k: v for k, v in n.items() if k in "
                '("driver", "node-name", "file", "filename", "backing")} | '
                '{"cache": new_cache} if "cache" in n else n for n in record.nodes)',
                what="cache change reopens with driver, node-name, file and cache only "
                "(detect-zeroes, discard, read-only reset)",
            ),
        ),
    ),
    Promise(
        id="drives-write-cache-change-refused",
        section="Drives of a running guest",
        quote="a mode that needs another one is refused with the ways out",
        tests=(I + "test_hotplug.py::test_live_cache_resize_and_throttle",),
        mutations=(
            Mutation(
                file="blockctl/_ops/drives.py",
                find="    if mode.write_cache != wce:",
                replace="    if False:",
                what="a cache mode needing another device write cache is not refused",
            ),
        ),
    ),
    Promise(
        id="drives-apply-never-touches-foreign",
        section="Drives of a running guest",
        quote="drives blockctl did not make are never touched",
        tests=(U + "test_drives_logic.py::test_attach_detach_and_live_changes",),
        mutations=(
            Mutation(
                file="blockctl/_ops/apply.py",
                find="            and current.device_driver is not None\n",
                replace="",
                what="apply detaches drives blockctl did not make",
            ),
        ),
    ),
    Promise(
        id="drives-q35-root-ports",
        section="Drives of a running guest",
        quote="each hot-plugged virtio disk or virtio-scsi controller goes into a free port",
        tests=(I + "test_q35.py::test_q35_hotplug_uses_root_ports_frees_and_reuses_them",),
        mutations=(
            Mutation(
                file="blockctl/_ops/drives.py",
                find='            await wire.device_add(vm.session, {**device, "bus": free[0]})',
                replace="            await wire.device_add(vm.session, dict(device))",
                what="a q35 hot-plug is sent to pcie.0 (QEMU refuses it)",
            ),
        ),
    ),
    Promise(
        id="drives-full-bus-names-way-out",
        section="Drives of a running guest",
        quote="a full `pc` bus gets the same message",
        tests=(I + "test_q35.py::test_a_full_pc_bus_is_refused_with_the_way_out",),
        mutations=(
            Mutation(
                file="blockctl/_ops/drives.py",
                find='            if "no slot/function available" not in str(exc):',
                replace="            if True:",
                what="QEMU's bare 'no slot/function available' reaches the user",
            ),
        ),
    ),
    Promise(
        id="drives-apply-says-pending-unplug",
        section="Drives of a running guest",
        quote="A detach the guest has not acknowledged is not done",
        tests=(
            I
            + "test_hotplug.py::"
            + "test_apply_reports_a_detach_the_guest_has_not_finished_then_finishes_it",
        ),
        mutations=(
            Mutation(
                file="blockctl/_ops/apply.py",
                find="        return result.state is ops.UnplugState.PENDING",
                replace="        return False",
                what="apply reports a disk detached while the guest still holds it",
            ),
        ),
    ),
    Promise(
        id="chains-commit-no-needless-reopen",
        section="Snapshots, chains and jobs",
        quote="A layer QEMU already has writable is not reopened",
        tests=(I + "test_chains.py::test_snapshot_commit_stream_under_writing_guest",),
        mutations=(
            Mutation(
                file="blockctl/_ops/nodes.py",
                find='        if recorded.get("read-only", False) != read_only:',
                replace='        if recorded.get("read-only") != read_only:',
                what="an intermediate commit reopens the writable active layer under the guest",
            ),
        ),
    ),
    Promise(
        id="drives-apply-checks-whole-plan",
        section="Drives of a running guest",
        quote="The whole plan is checked before anything changes",
        tests=(I + "test_apply.py::test_apply_checks_the_whole_plan_before_any_change",),
        mutations=(
            Mutation(
                file="blockctl/_ops/apply.py",
                find="    current = await check(vm, plan(desired, live, released))",
                replace="    current = plan(desired, live, released)",
                what="apply starts changing drives before it knows a later step fails",
            ),
        ),
    ),
    # Section: Snapshots, chains and jobs
    Promise(
        id="jobs-done-only-when-complete",
        section="Snapshots, chains and jobs",
        quote="a job counts as done only if it concluded with no `error` and `offset == len`",
        tests=(U + "test_jobs.py::test_concluded_without_error_but_short_is_a_failure",),
        mutations=(
            Mutation(
                file="blockctl/_jobs.py",
                find="        elif offset is None or length is None or offset != length:",
                replace="        elif offset is None or length is None:",
                what="a job that concluded short without an error counts as done",
            ),
        ),
    ),
    Promise(
        id="jobs-leaving-early-cancels",
        section="Snapshots, chains and jobs",
        quote="leaving an operation early cancels, drains and dismisses its job",
        tests=(
            U + "test_jobs.py::test_deadline_raises_and_leaving_the_block_cancels_and_dismisses",
            U + "test_jobs.py::test_leaving_the_block_on_any_error_cancels_and_dismisses",
        ),
        mutations=(
            Mutation(
                file="blockctl/_jobs.py",
                find="        finally:\n            if not job.done:\n",
                replace="        finally:\n            if False:\n",
                what="leaving the job's block early leaves the job running",
            ),
        ),
    ),
    Promise(
        id="snapshot-rollback-deletes-nodes",
        section="Snapshots, chains and jobs",
        quote="switch all disks in ONE `transaction` of `blockdev-snapshot`; any failure removes "
        "what was added.",
        tests=(I + "test_chains.py::test_failed_snapshot_removes_its_nodes_and_overlays",),
        mutations=(
            Mutation(
                file="blockctl/_ops/chains.py",
                find="await delete_nodes(vm, added, event=",
                replace="await delete_nodes(vm, added[:0], event=",
                what="a failed external snapshot's rollback keeps the overlay nodes "
                "(issue 22 survivor)",
            ),
        ),
    ),
    Promise(
        id="commit-shared-base-refused-unless-allowed",
        section="Snapshots, chains and jobs",
        quote="is refused unless `--allow-shared-base`",
        tests=(I + "test_chains.py::test_bad_chain_requests",),
        mutations=(
            Mutation(
                file="blockctl/_ops/chains.py",
                find="    if users and not allow_shared_base:",
                replace="    if users:",
                what="--allow-shared-base is ignored (issue 22 survivor: no test)",
            ),
            Mutation(
                file="blockctl/_ops/chains.py",
                find="    if users and not allow_shared_base:",
                replace="    if False:",
                what="a commit into a base another disk uses is not refused",
            ),
        ),
    ),
    Promise(
        id="commit-base-read-only-in-every-path",
        section="Snapshots, chains and jobs",
        quote="every one of them that is a backing layer afterwards goes back to read-only in "
        "every path",
        tests=(I + "test_truth.py::test_commit_interrupted_by_the_caller",),
        mutations=(
            Mutation(
                file="blockctl/_ops/chains.py",
                find='        await _restore_read_only(vm, device, restore, "commit.failed")',
                replace="        pass",
                what="a failed or cancelled commit leaves its base writable",
            ),
        ),
    ),
    Promise(
        id="snapshot-load-refuses-before-changing",
        section="Snapshots, chains and jobs",
        quote="**A load refuses before changing anything** unless every disk has the tag",
        tests=(I + "test_truth.py::test_snapshot_load_refuses_before_changing",),
        mutations=(
            Mutation(
                file="blockctl/_ops/chains.py",
                find="    if missing:\n        have = {",
                replace="    if False:\n        have = {",
                what="a load of a tag some disk lacks is sent to QEMU",
            ),
        ),
    ),
    Promise(
        id="ignore-retries-bounded",
        section="Snapshots, chains and jobs",
        quote="`ignore` retries the failing request, 16 times at most, then fails the job",
        tests=(
            U + "test_jobs.py::test_ignore_policy_resumes_a_stopped_job_a_bounded_number_of_times",
            U + "test_jobs.py::test_ignore_is_sent_to_qemu_as_stop_with_retries",
        ),
        mutations=(
            Mutation(
                file="blockctl/_jobs.py",
                find="IGNORE_RETRIES = 16",
                replace="IGNORE_RETRIES = 10**6",
                what="ignore retries a million times, not 16",
            ),
            Mutation(
                file="blockctl/_jobs.py",
                find="            if self._retried < self._retries:",
                replace="            if self._retried <= self._retries:",
                what="one retry more than asked for (off by one)",
            ),
        ),
    ),
    Promise(
        id="ignore-not-passed-to-qemu",
        section="Snapshots, chains and jobs",
        quote="blockctl does not pass `ignore` to QEMU",
        tests=(U + "test_jobs.py::test_ignore_is_sent_to_qemu_as_stop_with_retries",),
        mutations=(
            Mutation(
                file="blockctl/_jobs.py",
                find="        return QEMUErrorPolicy(ErrorPolicy.STOP.value, IGNORE_RETRIES)",
                replace="        return QEMUErrorPolicy(ErrorPolicy.IGNORE.value, IGNORE_RETRIES)",
                what="ignore is passed to QEMU as ignore",
            ),
        ),
    ),
    # Section: Backups
    Promise(
        id="backup-failed-keeps-writes",
        section="Backups",
        quote="the next backup (or `blockctl recover VM --repo DIR`) merges it into the last good "
        "point's bitmap and enables that again: every write since the last good point is still "
        "there",
        tests=(
            U + "test_checkpoints.py::"
            "test_failed_attempt_after_latest_is_merged_into_the_disabled_base_then_removed",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/checkpoints.py",
                find="            if leftovers:\n"
                '                actions.append(wire.bitmap_merge_action(node, base.name or "", '
                "leftovers))\n",
                replace="",
                what="a failed backup's bitmap is removed without being merged "
                "(issue 22 survivor: the bitmap consumed by a failure)",
            ),
            Mutation(
                file="blockctl/_backup/checkpoints.py",
                find="            if not base.recording:\n"
                '                actions.append(wire.bitmap_enable_action(node, base.name or ""))',
                replace="            if False:\n"
                '                actions.append(wire.bitmap_enable_action(node, base.name or ""))',
                what="the last good point's bitmap stays disabled after a failure",
            ),
        ),
    ),
    Promise(
        id="backup-failed-full-keeps-checkpoint",
        section="Backups",
        quote="A full backup that fails leaves R's checkpoint untouched.",
        tests=(I + "test_repository.py::test_a_failed_full_backup_keeps_the_checkpoint",),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="            if a.transaction_sent:\n"
                "                # Merge this attempt's bitmap",
                replace="            if False:\n                # Merge this attempt's bitmap",
                what="a failed backup does not settle the checkpoints (its bitmap lingers)",
            ),
        ),
    ),
    Promise(
        id="backup-request-once",
        section="Backups",
        quote="it recovers what the attempt left (as `blockctl recover`), then returns the point "
        "that attempt recorded, if its manifest was written, instead of taking a second one",
        tests=(I + "test_repository.py::test_a_retried_request_returns_the_point_it_recorded",),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="                    if manifest.request_id == request_id:\n",
                replace="                    if False:\n",
                what="a retried request takes a second point",
            ),
        ),
    ),
    Promise(
        id="backup-request-readopts-killed-copy",
        section="Backups",
        quote="it continues the copy from that same point in time (re-reading the export; chunks "
        "already stored are deduplicated) into the same point id",
        tests=(
            I + "test_backup_faults.py::"
            "test_controller_killed_at_every_step_then_recovered_loses_no_write",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="            None if request_id is None else await _adoptable(",
                replace="            None if True else await _adoptable(",
                what="a retry recovers a killed attempt's whole frozen point instead of "
                "re-adopting it (a fresh point, with the later writes)",
            ),
            Mutation(
                file="blockctl/_backup/operations.py",
                find="                job=None if request_id is None else "
                "backup_job_id(request_id, n),",
                replace="                job=None,",
                what="fleecing job ids not derived from the request id (a retry cannot find "
                "the job)",
            ),
        ),
    ),
    Promise(
        id="backup-manifest-atomic",
        section="Backups",
        quote="the manifest is written last, atomically. A point without a manifest is not a "
        "point.",
        tests=(
            U + "test_repository_store.py::test_a_manifest_write_that_fails_leaves_no_manifest",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/store.py",
                find="            _fsutil.atomic_write_bytes(\n"
                '                self._point_dir(manifest.vm, manifest.id) / "manifest.json",',
                replace="            (lambda p, data, **_: p.write_bytes(data))(\n"
                '                self._point_dir(manifest.vm, manifest.id) / "manifest.json",',
                what="the manifest is written in place, not atomically "
                "(issue 22 survivor: the atomic manifest write)",
            ),
        ),
    ),
    Promise(
        id="restore-raw-exact-size",
        section="Backups",
        quote="The data is written past the page cache (`O_DIRECT`) where the filesystem "
        "allows it, and a raw image is exactly the disk's size.",
        tests=(
            U + "test_repository_store.py::test_restore_to_raw_is_exact_with_or_without_o_direct",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="                os.ftruncate(fd, index.virtual_size)  # a padded last "
                "chunk's tail cut off",
                replace="                pass",
                what="a raw restore keeps the zero padding of its last direct write",
            ),
        ),
    ),
    Promise(
        id="restore-killed-leaves-nothing",
        section="Backups",
        quote="a failure, or a restore killed midway (SIGKILL, a crash), leaves nothing",
        tests=(
            I + "test_restore_killed.py::test_a_killed_restore_into_a_file_leaves_nothing_at_its_"
            "destination",
            I + "test_restore_killed.py::test_a_killed_restore_onto_a_block_device_leaves_its_"
            "start_zeros",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="    fd = _fsutil.unnamed_file(dest.parent)",
                replace="    fd = None",
                what="a restore writes the image under its name from the start",
            ),
            Mutation(
                file="blockctl/_backup/operations.py",
                find="            first = chunks[:1] if chunks[:1] == [0] else []",
                replace="            first: list[int] = []",
                what="a restore onto a device writes its first chunk among the others",
            ),
        ),
    ),
    Promise(
        id="restore-onto-remote-first-chunk-last",
        section="Drives of a running guest",
        quote="so a restore that fails or is killed midway leaves an image whose start reads zeros",
        tests=(
            I + "test_restore_remote.py::test_a_damaged_chunk_fails_the_restore_and_leaves_the_"
            "luns_start_zeros",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/remote.py",
                find="            if fmt is ImageFormat.RAW and size > first:",
                replace="            if False:",
                what="a restore onto a LUN writes the disk in order, its first chunk first",
            ),
        ),
    ),
    Promise(
        id="live-restore-failure-removes-everything",
        section="Backups",
        quote="A failure before the stream starts removes everything** (the device, the nodes, "
        "the server, the target file).",
        tests=(I + "test_live_restore.py::test_a_failure_before_the_stream_leaves_nothing",),
        mutations=(
            Mutation(
                file="blockctl/_backup/live.py",
                find="        elif not started:  # the guest has not had the disk long: take it "
                "away again",
                replace="        elif False:",
                what="a live restore whose stream failed to start leaves its disk attached",
            ),
        ),
    ),
    Promise(
        id="live-restore-server-holds-the-lock",
        section="Backups",
        quote="the server holds it too, by itself, for as long as it runs",
        tests=(
            I + "test_live_restore.py::test_a_server_holds_the_repository_lock_by_itself_until_"
            "it_stops",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/nbdkit_plugin.py",
                find="    _held.close()\n    _held = held\n",
                replace="    _held.close()\n",
                what="the server takes the repository's lock and lets it go at once",
            ),
            Mutation(
                file="blockctl/_backup/nbdkit_plugin.py",
                find="    _hold_lock(_image.repo)  # in the serving process",
                replace="    pass  # in the serving process",
                what="a detached server's lock is its exited launcher's: no server named",
            ),
            Mutation(
                file="blockctl/_backup/store.py",
                find="        servers = self.servers_holding() if exclusive else []",
                replace="        servers = []",
                what="a gc refused by a server says a backup may be writing",
            ),
        ),
    ),
    Promise(
        id="live-restore-prune-keeps-the-served-point",
        section="Backups",
        quote="Nor does a `prune` delete the point a server serves",
        tests=(
            I + "test_live_restore.py::test_prune_keeps_the_point_a_server_serves_until_it_stops",
            I + "test_live_restore.py::test_a_server_does_not_start_on_a_point_a_prune_is_deleting",
            U + "test_repository_store.py::test_prune_keeps_a_served_point_and_a_server_waits_"
            "for_a_deletion",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/store.py",
                find="                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
                replace="                pass",
                what="a prune deletes the point a server serves",
            ),
            Mutation(
                file="blockctl/_backup/nbdkit_plugin.py",
                find='        held.enter_context(repo.serving(_params["vm"], _params["point"]))',
                replace="        pass",
                what="the server does not hold its point: a prune deletes it",
            ),
            Mutation(
                file="blockctl/_backup/store.py",
                find='                os.stat("manifest.json", dir_fd=fd, follow_symlinks=False)',
                replace="                pass",
                what="a server starts on a point a prune is deleting",
            ),
            Mutation(
                file="blockctl/_backup/store.py",
                find="            fcntl.flock(fd, fcntl.LOCK_SH)  # waits for a prune deleting "
                "this point",
                replace="            pass",
                what="a starting server does not wait for a prune deleting its point",
            ),
        ),
    ),
    Promise(
        id="live-restore-encrypted-server-replaced",
        section="Backups",
        quote="an encrypted repository's server needs its key",
        tests=(
            I + "test_live_restore.py::test_a_server_killed_during_the_copy_then_recover_puts_in_"
            "a_new_one_and_finishes[mid-qcow2]",
        ),
        mutations=(
            Mutation(
                file="blockctl/_ops/recovery.py",
                find="    for repo in opened:",
                replace="    for repo in ():",
                what="recovery ignores the repository opened with its key",
            ),
        ),
    ),
    Promise(
        id="live-launch-raw-record-before-spawn",
        section="Backups",
        quote="(issue 18's two windows, closed for a qcow2 and a raw drive)",
        tests=(
            I + "test_live_launch.py::test_a_launch_whose_controller_is_killed_then_recover_"
            "finishes_it[spawned-raw]",
            U + "test_launch_windows.py::test_a_raw_launch_killed_before_qemu_started_removes_"
            "the_files_it_made",
        ),
        mutations=(
            Mutation(
                file="blockctl/_ops/recovery.py",
                find='            if str(node["node-name"]) in present:',
                replace="            if True:",
                what="recovery of a launch killed at QEMU's spawn mirrors into no target",
            ),
            Mutation(
                file="blockctl/_journal.py",
                find="        if facts.qemu_never_ran and intent.server is not None and "
                "intent.created_files:",
                replace="        if False:",
                what="a launch killed before QEMU's spawn leaves the files it made",
            ),
        ),
    ),
    Promise(
        id="live-restore-hotplug-record-before-attach",
        section="Backups",
        quote="**The hot-plug path's window** (`--attach`, closed): the copy's record is written "
        "before the hot-plug",
        tests=(
            I + "test_live_restore.py::test_a_controller_killed_during_the_copy_then_recover_"
            "finishes_with_every_guest_write[attached-qcow2]",
            U + "test_hotplug_window.py",
        ),
        mutations=(
            Mutation(
                file="blockctl/_journal.py",
                find="    if intent.server is not None and (intent.hotplug_nodes or not "
                "intent.devices) and not attached:",
                replace="    if False:",
                what="recovery of a restore killed before its device_add leaves its files and "
                "server",
            ),
        ),
    ),
    Promise(
        id="live-restore-record-before-server",
        section="Backups",
        quote="**The server's start** (closed, both paths): the copy's first record is written "
        "before the backup's server starts",
        tests=(
            U + "test_launch_windows.py::test_a_server_is_found_by_its_pid_file_only_if_it_"
            "serves_that_home",
            U + "test_launch_windows.py::test_a_launch_killed_before_its_record_named_the_"
            "servers_pid_is_recovered",
            U + "test_launch_windows.py::test_a_server_that_has_not_written_its_pid_file_is_"
            "found_by_its_command_line",
            U + "test_launch_windows.py::test_a_server_stopped_as_it_forks_leaves_no_child_behind",
            U + "test_hotplug_window.py::test_killed_before_its_record_named_the_servers_pid_"
            "recover_stops_it",
            I + "test_live_launch.py::test_a_launch_killed_once_its_server_listens_then_recover_"
            "leaves_nothing",
            I + "test_live_restore.py::test_a_restore_killed_once_its_server_listens_then_"
            "recover_leaves_nothing",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/live.py",
                find="                            starting=starting,\n",
                replace="",
                what="a launch's record is written after its server starts",
            ),
            Mutation(
                file="blockctl/_backup/live.py",
                find="            starting=starting,\n        ) as export:",
                replace="        ) as export:",
                what="a hot-plug restore's record is written after its server starts",
            ),
            Mutation(
                file="blockctl/_ops/recovery.py",
                find="        found = servers_in(Path(server.home))",
                replace="        found: list[tuple[int, int]] = []",
                what="recovery leaves a server recorded before its pid",
            ),
            Mutation(
                file="blockctl/_backup/serve.py",
                find='    serves = (b"--unix", socket) in itertools.pairwise(argv)',
                replace="    serves = True",
                what="recovery stops an nbdkit of another directory its pid file names",
            ),
            Mutation(
                file="blockctl/_backup/serve.py",
                find='    pids = sorted(int(entry) for entry in os.listdir("/proc") '
                "if entry.isdigit())",
                replace="    pids: list[int] = []",
                what="a server that has not written its pid file yet is not found",
            ),
            Mutation(
                file="blockctl/_ops/recovery.py",
                find="SERVER_SEARCHES = 5",
                replace="SERVER_SEARCHES = 1",
                what="the child of a server stopped as it forked is left running",
            ),
            Mutation(
                file="blockctl/_journal.py",
                find="        if intent.server is not None and not intent.devices:",
                replace="        if False:",
                what="a restore killed before its hot-plug's plan, QEMU gone, leaves its files",
            ),
        ),
    ),
    Promise(
        id="stream-never-left-concluded",
        section="Backups",
        quote="**Since 2026-12-05 blockctl's streams never sit concluded:** `wire.block_stream` "
        "starts them with `auto-finalize: false` and `auto-dismiss: true`",
        tests=(
            U + "test_jobs.py::test_a_stream_is_finalized_at_pending_and_dismissed_by_qemu",
            U + "test_jobs.py::test_a_failed_stream_gone_with_its_conclusion_reports_the_error",
            U + "test_jobs.py::test_a_stream_still_listed_at_its_conclusion_is_dismissed",
            U + "test_jobs.py::test_an_adopted_stream_found_pending_is_finalized_once_listened_to",
            I + "test_stream_query.py::test_another_clients_graph_reads_in_a_loop_survive_"
            "blockctls_streams",
        ),
        mutations=(
            Mutation(
                file="blockctl/_qmp/wire.py",
                find="    options = _job_options(job_id, speed, False, extra, auto_dismiss=True)",
                replace="    options = _job_options(job_id, speed, True, extra)",
                what="streams start as every other job (auto-finalize on, auto-dismiss off)",
            ),
            Mutation(
                file="blockctl/_qmp/wire.py",
                find="    options = _job_options(job_id, speed, False, extra, auto_dismiss=True)",
                replace="    options = _job_options(job_id, speed, False, extra)",
                what="a stream is finalized by blockctl but dismissed by a second command",
            ),
            Mutation(
                file="blockctl/_jobs.py",
                find="the moment it concludes).\n            await self._finalize()",
                replace="the moment it concludes).\n            pass",
                what="an adopted job found PENDING is never finalized",
            ),
            Mutation(
                file="blockctl/_jobs.py",
                find="                    if info is None and self.auto_dismiss:",
                replace="                    if False:",
                what="a stream QEMU dismissed is dismissed again",
            ),
        ),
    ),
    Promise(
        id="live-restore-given-up-leaves-no-copy-node",
        section="Backups",
        quote="**deletes what is left of the copy in QEMU**",
        tests=(
            I + "test_live_restore.py::test_a_raw_restore_given_up_leaves_no_node_of_its_target",
            U + "test_live_give_up.py",
        ),
        mutations=(
            Mutation(
                file="blockctl/_ops/recovery.py",
                find="            done.extend(await _give_up_live(vm, intent))\n",
                replace="",
                what="a given-up raw restore leaves its target's nodes in QEMU",
            ),
            Mutation(
                file="blockctl/_ops/recovery.py",
                find="    if left:\n",
                replace="    if False:\n",
                what="the files a given-up restore leaves are not named",
            ),
            Mutation(
                file="blockctl/_ops/recovery.py",
                find=(
                    '                if "password-secret" in n and str(n["node-name"]) in deleted\n'
                ),
                replace='                if "password-secret" in n\n',
                what="a CHAP secret a node still in use reads is deleted with the others",
            ),
            Mutation(
                file="blockctl/_ops/recovery.py",
                find="        await delete_secrets(\n            vm,\n            [\n",
                replace="        await delete_secrets(\n            vm,\n            [] and [\n",
                what="a given-up LUN restore's CHAP secret object is left in QEMU",
            ),
        ),
    ),
    Promise(
        id="recover-killed-inside-a-server-replacement",
        section="Backups",
        quote="**`recover` killed inside that replacement** is finished or undone by the next one",
        tests=(
            I + "test_live_restore.py::test_a_server_killed_during_the_copy_then_recover_puts_"
            "in_a_new_one_and_finishes[start-qcow2]",
            I + "test_live_restore.py::test_a_server_killed_during_the_copy_then_recover_puts_"
            "in_a_new_one_and_finishes[start-raw]",
            U + "test_launch_windows.py::test_qemu_gone_after_a_recover_killed_inside_a_server_"
            "replacement_stops_both",
        ),
        mutations=(
            Mutation(
                file="blockctl/_ops/recovery.py",
                find="    if intent.replacement is not None and not _journal.owner_alive(intent):",
                replace="    if False:",
                what="a replacement a killed recover left is neither finished nor undone",
            ),
            Mutation(
                file="blockctl/_ops/recovery.py",
                find="    if image is not None and image.backing == intent.replacement_base:",
                replace="    if False:",
                what="a replacement QEMU already reads through is undone",
            ),
            Mutation(
                file="blockctl/_ops/recovery.py",
                find="        if item.replacement is not None:  # a recover killed inside it",
                replace="        if False:  # a recover killed inside it",
                what="QEMU gone, a killed recover's new server is left running",
            ),
        ),
    ),
    Promise(
        id="fleet-retry-refuses-an-unsettled-operation",
        section="Fleet",
        quote="a record kept for attention, or another client's operation still running, fails "
        "the VM, final",
        tests=(
            U + "test_fleet_activities.py::test_a_retry_that_finds_an_unsettled_operation_fails_"
            "naming_it_and_the_way_out",
        ),
        mutations=(
            Mutation(
                file="blockctl/_fleet/activities.py",
                find="    if unsettled:\n        raise UnsafeOperation(",
                replace="    if False:\n        raise UnsafeOperation(",
                what="a retried snapshot or commit reports done over a half-done operation",
            ),
        ),
    ),
    Promise(
        id="live-restore-rides-out-a-short-outage",
        section="Backups",
        quote="a server outage shorter than `reconnect-delay`",
        tests=(I + "test_live_restore.py::test_live_restore_while_the_guest_reads_and_writes",),
        mutations=(
            Mutation(
                file="blockctl/_backup/serve.py",
                find="RECONNECT_DELAY = 10",
                replace="RECONNECT_DELAY = 0",
                what="the backup's NBD node fails its requests at the first outage",
            ),
        ),
    ),
    Promise(
        id="live-restore-qemu-gone-keeps-record",
        section="Backups",
        quote="the controller now keeps the record whenever QEMU is gone and raises "
        "`ConnectionLost`",
        tests=(
            I + "test_live_restore.py::test_qemu_killed_during_the_copy_then_recover_says_how_to_"
            "finish_keeping_the_guest_writes[start-qcow2]",
            I + "test_live_restore.py::test_qemu_killed_during_the_copy_then_recover_says_how_to_"
            "finish_keeping_the_guest_writes[end-qcow2]",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/live.py",
                find="        if vm.session.lost and op is not None:\n"
                "            # QEMU is gone, before the stream or during it",
                replace="        if False:\n"
                "            # QEMU is gone, before the stream or during it",
                what="QEMU killed before the stream starts: the rollback drops the record",
            ),
            Mutation(
                file="blockctl/_backup/live.py",
                find="    _gone_after_the_copy(vm, device_id, op)\n"
                "    record = vm.registry.drives[device_id]",
                replace="    record = vm.registry.drives[device_id]",
                what="QEMU killed after the stream concluded: the restore reports success",
            ),
        ),
    ),
    Promise(
        id="backup-index-after-chunks-durable",
        section="Backups",
        quote="an index is written only after every chunk it names and their directories are "
        "fsynced",
        tests=(I + "test_backup.py::test_one_transaction_fixes_the_point_of_every_disk",),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="            await anyio.to_thread.run_sync(batch.sync)",
                replace="            pass",
                what="the index and manifest are written before the chunks are made durable",
            ),
        ),
    ),
    Promise(
        id="backup-one-transaction-for-all-disks",
        section="Backups",
        quote="added in the same `transaction` that fixes the point",
        tests=(I + "test_backup.py::test_one_transaction_fixes_the_point_of_every_disk",),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="                    start_for(d, i == len(disks) - 1),",
                replace="                    start_for(d, True),",
                what="each disk's bitmap and fleecing job in its own transaction "
                "(issue 22 survivor: grouped completion across disks)",
            ),
        ),
    ),
    Promise(
        id="backup-teardown-on-failure",
        section="Backups",
        quote="Exports, jobs, nodes and scratch files are torn down in every path.",
        tests=(I + "test_backup.py::test_one_transaction_fixes_the_point_of_every_disk",),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="        for job in jobs:\n            if not job.done:",
                replace="        for job in jobs[:0]:\n            if not job.done:",
                what="the backup's teardown leaves its fleecing jobs running (a failed "
                "backup's teardown runs in the job stack and again after it: dropping one of "
                "the two calls changes nothing)",
            ),
        ),
    ),
    Promise(
        id="backup-zero-chunks-not-stored",
        section="Backups",
        quote="one chunk (zero chunks are never stored)",
        tests=(U + "test_repository_store.py::test_zero_chunks_are_never_stored_nor_read",),
        mutations=(
            Mutation(
                file="blockctl/_backup/reader.py",
                find="                if zeros.startswith(data):",
                replace="                if False:",
                what="chunks of zeros are hashed and stored",
            ),
        ),
    ),
    Promise(
        id="restore-checks-every-chunk-digest",
        section="Backups",
        quote="every chunk against its digest before it is written",
        tests=(
            U + "test_repository_hostile.py::"
            "test_hostile_repository_is_refused_without_touching_the_outside"
            "[chunk-of-other-content-restore]",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/store.py",
                find="        if len(payload) != length or self.digest(payload) != digest:",
                replace="        if len(payload) != length:",
                what="a chunk's content is not checked against its digest",
            ),
        ),
    ),
    Promise(
        id="verify-names-every-affected-point",
        section="Backups",
        quote="names every point (of any VM in the repository) that references a damaged chunk",
        tests=(I + "test_repository.py::test_encrypted_repository_roundtrip_wrong_key_and_tamper",),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find="                        if repo.read_index(vm, other.id, disk.device)"
                ".referenced() & bad:",
                replace="                        if other.id == point and "
                "repo.read_index(vm, other.id, disk.device).referenced() & bad:",
                what="verify names only the point it checked, not the others sharing the chunk",
            ),
        ),
    ),
    Promise(
        id="prune-keeps-newest",
        section="Backups",
        quote="the newest point always stays",
        tests=(U + "test_repository_store.py::test_prune_keeps_the_newest_and_what_it_references",),
        mutations=(
            Mutation(
                file="blockctl/_backup/operations.py",
                find=(
                    "    keep = {m.id for m in (latest_holding(manifests, d) for d in devices) "
                    "if m is not None}"
                ),
                replace="    keep: set[str] = set()",
                what="prune may delete the newest point (each disk's checkpoint)",
            ),
        ),
    ),
    Promise(
        id="repository-wrong-key-refused",
        section="Backups",
        quote="A wrong key is refused before anything is read or written",
        tests=(
            U + "test_repository_store.py::"
            "test_a_wrong_or_missing_key_is_refused_before_anything_is_written",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/crypto.py",
                find="    except (InvalidTag, ValueError) as exc:",
                replace="    except ValueError as exc:",
                what="a wrong key's failed unwrap is not turned into a refusal",
            ),
        ),
    ),
    Promise(
        id="repository-names-validated",
        section="Backups",
        quote="every name read from it (point ids, VM and device names, digests) is validated "
        "before it touches the filesystem",
        tests=(
            U + "test_repository_hostile.py::"
            "test_hostile_repository_is_refused_without_touching_the_outside"
            "[manifest-device-traversal-restore]",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/store.py",
                find='_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\\Z")',
                replace='_NAME = re.compile(r"[A-Za-z0-9./][A-Za-z0-9._+/-]{0,127}\\Z")',
                what="names read from the repository may contain '/'",
            ),
        ),
    ),
    Promise(
        id="repository-gc-exclusive",
        section="Backups",
        quote="`gc` takes the lock exclusively, so it never collects the chunks of a backup that "
        "has not committed yet",
        tests=(
            U + "test_repository_store.py::"
            "test_gc_refuses_while_another_open_file_holds_the_shared_lock",
        ),
        mutations=(
            Mutation(
                file="blockctl/_backup/store.py",
                find="            shared=not exclusive,",
                replace="            shared=True,",
                what="gc takes the repository lock shared",
            ),
        ),
    ),
    # Section: Guest agent
    Promise(
        id="agent-thaw-always-runs",
        section="Guest agent",
        quote="**The thaw always runs**, in a shielded `finally`",
        tests=(U + "test_agent.py::test_thawed_when_the_controller_task_is_cancelled",),
        mutations=(
            Mutation(
                file="blockctl/_agent.py",
                find="        with anyio.CancelScope(shield=True):\n"
                "            await _thaw(agent, log, frozen=count, frozen_at=frozen_at, "
                "timeout=timeout)",
                replace="        with anyio.CancelScope(shield=False):\n"
                "            await _thaw(agent, log, frozen=count, frozen_at=frozen_at, "
                "timeout=timeout)",
                what="the thaw is not shielded: a cancelled operation leaves the guest frozen",
            ),
        ),
    ),
    Promise(
        id="agent-freeze-count-checked",
        section="Guest agent",
        quote="the freeze must cover every filesystem `guest-get-fsinfo` lists",
        tests=(U + "test_agent.py::test_freezing_fewer_filesystems_than_mounted_fails_and_thaws",),
        mutations=(
            Mutation(
                file="blockctl/_agent.py",
                find="        if count < expected:",
                replace="        if count < 0:",
                what="a freeze that missed filesystems counts as consistent",
            ),
        ),
    ),
    Promise(
        id="agent-foreign-freeze-left-alone",
        section="Guest agent",
        quote="A guest already frozen by someone else is refused and left alone.",
        tests=(U + "test_agent.py::test_a_guest_frozen_by_someone_else_is_refused_and_left_alone",),
        mutations=(
            Mutation(
                file="blockctl/_agent.py",
                find="    if await agent.fsfreeze_status() is FreezeStatus.FROZEN:",
                replace="    if False:",
                what="a guest someone else froze is frozen again and thawed by blockctl",
            ),
        ),
    ),
    Promise(
        id="agent-freeze-record-kept-until-verified-thaw",
        section="Guest agent",
        quote="only a verified thaw removes it (a `ThawFailed` keeps it)",
        tests=(U + "test_freeze_record.py::test_the_record_stays_when_the_thaw_fails",),
        mutations=(
            Mutation(
                file="blockctl/_agent.py",
                find="            await _thaw(agent, log, frozen=count, frozen_at=frozen_at, "
                "timeout=timeout)\n"
                "            if record is not None:  # not reached when the thaw failed: the "
                "record stays\n"
                "                _journal.remove_durably(record)",
                replace="            if record is not None:\n"
                "                _journal.remove_durably(record)\n"
                "            await _thaw(agent, log, frozen=count, frozen_at=frozen_at, "
                "timeout=timeout)",
                what="the freeze record is removed before the thaw is verified",
            ),
        ),
    ),
    Promise(
        id="agent-live-writer-never-thawed",
        section="Guest agent",
        quote="A record whose writer still runs is never acted on",
        tests=(U + "test_freeze_record.py::test_a_live_writer_is_never_thawed_nor_asked",),
        mutations=(
            Mutation(
                file="blockctl/_agent.py",
                find="    if writer_alive:\n        return ThawPlan(",
                replace="    if False:\n        return ThawPlan(",
                what="recovery thaws a freeze whose controller still runs",
            ),
        ),
    ),
    # Section: Reliability (its own text, Injection-proof inputs, Hygiene, Fault injection)
    Promise(
        id="hygiene-locking-never-off",
        section="Reliability",
        quote="`wire.blockdev_add` / `blockdev_reopen` refuse one that does not, or one that sets "
        "`locking` off",
        tests=(U + "test_hygiene.py::test_blockdev_add_refuses_nodes_without_a_driver",),
        mutations=(
            Mutation(
                file="blockctl/_qmp/wire.py",
                find='        if key == "locking" and value not in ("on", "auto"):',
                replace='        if key == "lock" and value not in ("on", "auto"):',
                what="a node that turns image locking off is sent",
            ),
            Mutation(
                file="blockctl/_qmp/wire.py",
                find='    if not isinstance(options.get("driver"), str) or not '
                'isinstance(options.get("node-name"), str):',
                replace='    if not isinstance(options.get("node-name"), str):',
                what="a node without a driver (QEMU would probe the format) is sent",
            ),
        ),
    ),
    Promise(
        id="injection-bitmap-merge-never-empty",
        section="Reliability",
        quote="blockctl never sends `block-dirty-bitmap-merge` with an empty `bitmaps` list",
        tests=(U + "test_injection.py::test_bitmap_merge_never_sends_an_empty_list",),
        mutations=(
            Mutation(
                file="blockctl/_qmp/wire.py",
                find="        if not isinstance(bitmaps, list) or not bitmaps:",
                replace="        if not isinstance(bitmaps, list):",
                what="an empty bitmap merge (a QEMU 7.2 crash) is sent",
            ),
        ),
    ),
    Promise(
        id="injection-one-literal-value",
        section="Reliability",
        quote="Each input is used as one literal value",
        tests=(
            U + "test_argv.py::test_boot_option",
            U + "test_injection.py::test_config_strings_are_one_literal_value_in_the_argv",
        ),
        mutations=(
            Mutation(
                file="blockctl/_argv.py",
                find='    return value.replace(",", ",,")',
                replace="    return value",
                what="commas in QemuOpts values are not doubled",
            ),
        ),
    ),
    Promise(
        id="fault-ignore-exact-after-retry",
        section="Reliability",
        quote="the retry succeeds and the result is exact",
        tests=(U + "test_jobs.py::test_a_transient_error_retried_under_ignore_still_succeeds",),
        mutations=(
            Mutation(
                file="blockctl/_jobs.py",
                find='        if record.action == "ignore" and self.io_errors >= '
                "self._ignored_error_limit:",
                replace='        if record.action == "ignore":',
                what="the first ignored error gives the job up",
            ),
        ),
    ),
    # Section: Crash recovery
    Promise(
        id="recovery-paused-job-needs-attention",
        section="Crash recovery",
        quote="| the job paused (an I/O error policy) | nothing; says to resume or cancel it | "
        "`needs-attention` (kept) |",
        tests=(U + "test_journal.py::test_a_paused_job_needs_attention_and_nothing_is_touched",),
        mutations=(
            Mutation(
                file="blockctl/_journal.py",
                find="        if job.status in _ACTIVE_JOB:",
                replace="        if True:",
                what="recovery adopts a job paused on an I/O error",
            ),
        ),
    ),
    Promise(
        id="recovery-files-deleted-only-unused",
        section="Crash recovery",
        quote="deletes their files (if asked, and only if no other node has them open)",
        tests=(U + "test_journal.py::test_files_are_deleted_only_when_asked_and_not_open",),
        mutations=(
            Mutation(
                file="blockctl/_journal.py",
                find="        unused = tuple(f for f in intent.drop_files if f not in used)",
                replace="        unused = tuple(intent.drop_files)",
                what="recovery deletes a dropped layer's file that another node still has open",
            ),
        ),
    ),
    Promise(
        id="recovery-qemu-gone-relinks",
        section="Crash recovery",
        quote="gets the image above the dropped layers pointed back at them",
        tests=(
            U
            + "test_journal.py::test_qemu_gone_after_a_stream_or_commit_job_relinks_the_old_chain",
        ),
        mutations=(
            Mutation(
                file="blockctl/_journal.py",
                find="        if not dropped or len(fmts) != len(files) or dropped[0] == 0:",
                replace="        if True:",
                what="no relink after QEMU died under a stream or intermediate commit",
            ),
        ),
    ),
    Promise(
        id="recovery-vm-exists-until-recovered",
        section="Crash recovery",
        quote="cannot be started again under its name (`VMExists`) until `blockctl recover` has "
        "reported them",
        tests=(
            I
            + "test_crash.py::test_qemu_killed_mid_operation_chain_reads_the_same[commit-planned]",
        ),
        mutations=(
            Mutation(
                file="blockctl/_machine.py",
                find="        if _journal.load_all(run_dir):  # never drop an unreported "
                "interrupted operation",
                replace="        if False:",
                what="a new VM of a crashed VM's name wipes its journal records",
            ),
        ),
    ),
    # Section: Untrusted images
    Promise(
        id="untrusted-backing-outside-roots",
        section="Untrusted images",
        quote="a backing file that resolves (realpath: symlinks and `../` followed) outside the "
        "**allowed roots**",
        tests=(I + "test_untrusted.py::test_rejected_at_launch[symlink-escape]",),
        mutations=(
            Mutation(
                file="blockctl/_images.py",
                find="        resolved = Path(os.path.realpath(backing_path))",
                replace="        resolved = Path(os.path.abspath(backing_path))",
                what="a backing symlink is not followed before the roots check",
            ),
        ),
    ),
    Promise(
        id="untrusted-data-file-refused",
        section="Untrusted images",
        quote="any external data file (qcow2 `data-file`)",
        tests=(I + "test_untrusted.py::test_rejected_at_launch[data-file]",),
        mutations=(
            Mutation(
                file="blockctl/_images.py",
                find="        if data_file is not None:",
                replace="        if data_file is not None and not data_file:",
                what="an image with an external data file is opened",
            ),
        ),
    ),
    Promise(
        id="untrusted-protocol-backing-refused",
        section="Untrusted images",
        quote="a backing name QEMU would parse as a protocol",
        tests=(I + "test_untrusted.py::test_rejected_at_launch[json-backing]",),
        mutations=(
            Mutation(
                file="blockctl/_images.py",
                find='    return ":" in name.split("/", 1)[0]',
                replace='    return "://" in name',
                what="only URLs count as protocols (json:, nbd: pass as file names)",
            ),
        ),
    ),
    Promise(
        id="untrusted-vmdk-extent",
        section="Untrusted images",
        quote="a VMDK extent outside the allowed roots",
        tests=(I + "test_untrusted.py::test_rejected_at_launch[vmdk-flat-extent]",),
        mutations=(
            Mutation(
                file="blockctl/_images.py",
                find='        for extent in specific.get("extents", ()) if current_fmt is '
                "ImageFormat.VMDK else ():",
                replace="        for extent in ():",
                what="VMDK extents are not checked",
            ),
        ),
    ),
    # Section: Private by construction
    Promise(
        id="private-atomic-write-mode-before-bytes",
        section="Private by construction",
        quote="a pid-tagged temporary file created `O_EXCL|O_NOFOLLOW` and made 0600 before any "
        "byte",
        tests=(U + "test_fsutil.py::test_atomic_write_sets_the_mode_asked_for_exactly",),
        mutations=(
            Mutation(
                file="blockctl/_fsutil.py",
                find="            os.fchmod(fd, mode)\n            view = memoryview(data)",
                replace="            view = memoryview(data)",
                what="the atomic writer leaves the mode to the umask",
            ),
        ),
    ),
    Promise(
        id="private-image-created-before-qemu-img",
        section="Private by construction",
        quote="An image file is created empty with its mode *before* qemu-img opens it",
        tests=(I + "test_private_modes.py::test_created_and_converted_images_are_0600[umask022]",),
        mutations=(
            Mutation(
                file="blockctl/_images.py",
                find="            _fsutil.create_private_file(path, mode=mode)\n"
                "            created = True",
                replace="            created = False",
                what="images are created by qemu-img under the umask (0644)",
            ),
        ),
    ),
    Promise(
        id="private-loose-dir-refused",
        section="Private by construction",
        quote="refuses a directory others can write or another user owns",
        tests=(U + "test_fsutil.py::test_check_private_dir_refuses_a_writable_dir",),
        mutations=(
            Mutation(
                file="blockctl/_fsutil.py",
                find="    if mode & 0o022:",
                replace="    if mode & 0o002:",
                what="a group-writable directory passes as private",
            ),
        ),
    ),
    Promise(
        id="private-run-dir-0700",
        section="Private by construction",
        quote="run directories 0700",
        tests=(I + "test_private_modes.py::test_up_run_dir_and_its_disk_are_owner_only[umask000]",),
        mutations=(
            Mutation(
                file="blockctl/_machine.py",
                find="        run_dir.mkdir(mode=_fsutil.PRIVATE_DIR)\n"
                "    os.chmod(run_dir, _fsutil.PRIVATE_DIR)  # explicitly, whatever the umask",
                replace="        run_dir.mkdir(mode=_fsutil.PRIVATE_DIR)\n"
                "    os.chmod(run_dir, 0o755)",
                what="a named VM's run directory is made 0755",
            ),
        ),
    ),
)


def mutation_key(promise: Promise, n: int) -> str:
    """The mutation's name in reports and ``--only``: the promise id, ``#n`` from the second."""
    return promise.id if n == 0 else f"{promise.id}#{n + 1}"


def mutations() -> list[tuple[str, Promise, Mutation]]:
    """Every mutation of the ledger with its key, in ledger order."""
    return [(mutation_key(p, n), p, m) for p in PROMISES for n, m in enumerate(p.mutations)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(results: dict[str, str] | None = None) -> str:
    """The README's ledger table (markdown): one row per mutation. ``results``: mutation key →
    outcome (default: "killed" for every row, which is what CI requires)."""
    lines = [
        "| promise | section | tests | mutation (file: what it breaks) | result |",
        "|---|---|---|---|---|",
    ]
    for key, promise, mutation in mutations():
        tests = ", ".join(f"`{t.removeprefix('tests/')}`" for t in promise.tests)
        outcome = "killed" if results is None else results.get(key, "not run")
        where = mutation.file.removeprefix("blockctl/")
        lines.append(
            f"| `{key}` | {_cell(promise.section)} | {_cell(tests)} | "
            f"`{where}`: {_cell(mutation.what)} | {outcome} |"
        )
    return "\n".join(lines) + "\n"
