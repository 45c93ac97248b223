"""The upgrade engine: explicit phases, each resource registering its own undo.

    inspect -> plan -> [libvirt] -> destination -> transfer -> | switchover -> retire
                                                                ^ point of no return
                                                    -> relocate -> [adopt]

    cpr-exec (one process, cprexec.py):
    inspect -> plan -> rehearsal -> settings -> | migrate + exec -> the new image resumes
                                                ^ point of no return

Until the destination runs the guest, the source is authoritative. Each
resource acquired before switchover registers how to undo itself on one
stack, as it is acquired: the libvirt pause (start the daemon again), the
source session (cancel, resume, give back our settings), the destination
(kill it), the private paths (remove them). Any error, the timeout or a
cancellation (Ctrl-C, SIGTERM, SIGHUP) closes that stack under shield, in
reverse order: the destination is always dead before the source resumes, so
only one copy of the guest ever runs. At switchover the stack is dropped:
from then on the upgrade only goes forward, shielded from cancellation.

What the engine cannot do for itself is survive its own death. So before it
changes anything it takes the VM's lock, starts a keeper (keeper.py) and
writes each step to the VM's journal (journal.py) before carrying it out;
if this process dies, the keeper repairs the VM from that record
(recovery.py), rolling back or forward by the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liveupgrade import (
    context,
    cprexec,
    fdpass,
    handover,
    history,
    journal,
    libvirt_domain,
    monitor,
    procs,
    ramconvert,
    source,
    target,
)
from liveupgrade.bugs import KNOWN_BUGS
from liveupgrade.cmdline import CommandLine
from liveupgrade.destination import Destination, DestinationLog
from liveupgrade.errors import (
    DestinationFailed,
    LiveUpgradeError,
    MonitorError,
    Refused,
    SwitchoverFailed,
    TargetBinaryError,
    TransferFailed,
    UsageError,
)
from liveupgrade.keeper import Keeper
from liveupgrade.memory import layout
from liveupgrade.modes import Mode, ModeInputs, parse_mode, transfer_settings
from liveupgrade.plan import DestinationPlan, Override, build_destination
from liveupgrade.preflight import (
    FORCEABLE,
    Preflight,
    check_handover,
    check_host,
    check_mode,
    check_roms,
    check_source,
    check_target,
)
from liveupgrade.report import PlanReport, UpgradeEvent, UpgradeResult
from liveupgrade.session import SourceSession, reset_on_new_qemu
from liveupgrade.switchover import move_into_place, rebind_vnc, retire_source

EventCallback = Callable[[UpgradeEvent], None]
PROGRESS_INTERVAL = 0.1


@dataclass
class _Progress:
    """Phase events for the caller, and how long each phase took."""

    on_event: EventCallback
    phases_ms: dict[str, float] = field(default_factory=dict)

    def emit(self, phase: str, message: str, **figures: int | None) -> None:
        self.on_event(UpgradeEvent(phase, message, **figures))

    @contextlib.asynccontextmanager
    async def phase(self, name: str, message: str) -> AsyncIterator[None]:
        self.emit(name, message)
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases_ms[name] = round((time.monotonic() - started) * 1e3, 1)


class _Undo:
    """The undo stack of the steps before switchover.

    Each undo runs even if an earlier one failed; failures are collected, so
    the caller can tell a complete rollback from one the keeper must finish.
    """

    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()
        self.failures: list[str] = []
        self.fixes: list[str] = []  # what the failed undos say to do, for the final error

    def push(self, what: str, undo: Callable[[], Awaitable[object]]) -> None:
        async def run() -> None:
            try:
                await undo()
            except Exception as e:
                self.failures.append(f"{what}: {e}")
                if isinstance(e, LiveUpgradeError) and e.fix:
                    self.fixes.append(e.fix)
        self.stack.push_async_callback(run)

    async def roll_back(self) -> None:
        await asyncio.shield(self.stack.aclose())

    def drop(self) -> None:
        """The point of no return: nothing before it may be undone any more."""
        self.stack.pop_all()


class _Transaction:
    """The upgrade as a transaction that outlives this process: the VM's lock, its
    journal, and its keeper (journal.py, keeper.py).

    `ended` is true while nothing needs repair (nothing changed yet, fully rolled
    back, or finished): closing then removes the journal and dismisses the keeper.
    Otherwise closing hands the journal to the keeper, which repairs the VM.
    """

    def __init__(self, lock: journal.VMLock, record: journal.Journal, keeper: Keeper):
        self.lock, self.journal, self.keeper = lock, record, keeper
        self.ended = True
        self.result: UpgradeResult | None = None

    @classmethod
    async def open(cls, held: contextlib.AsyncExitStack, proc: source.SourceProcess
                   ) -> _Transaction:
        """Take the VM's lock (refusing if an upgrade runs or was interrupted), start the
        keeper; both are released by `held`."""
        key, label = journal.key_of(proc.cmdline, proc.pid), _vm_label(proc)
        lock = held.enter_context(journal.claimed(key, label))
        record = journal.Journal.begin(key, vm=label, engine_pid=os.getpid(), source={
            "pid": proc.pid, "create_time": proc.create_time, "qmp_path": str(proc.qmp_path)})
        # The keeper starts (Python's own start-up) while we plan; it is armed from
        # its first instruction, and awaited before the first change.
        keeper = await Keeper.spawn(record.path, lock.fd)
        lock.note_owners(os.getpid(), keeper.pid)
        record.facts["keeper_pid"] = keeper.pid
        tx = cls(lock, record, keeper)
        held.push_async_exit(tx.close)
        return tx

    async def close(self, _type: object, error: BaseException | None, _tb: object) -> None:
        if self.ended:
            self.journal.remove()
        await self.keeper.dismiss(self.ended)
        why = (None if error is None else str(error) if isinstance(error, LiveUpgradeError)
               else f"interrupted ({type(error).__name__})")
        history.note(self.journal.key, self.journal.label, self.result, why)


def _vm_label(proc: source.SourceProcess) -> str:
    name = proc.cmdline.first("name")
    return (name.prop("guest") if name is not None else None) or str(proc.pid)


async def upgrade(
    source_spec: str | int,
    target_binary: str | Path,
    *,
    mode: str | Mode = Mode.AUTO,
    bandwidth: float | None = None,
    timeout: float = 600.0,
    downtime_limit: int = 100,
    overrides: list[str] | list[Override] | None = None,
    force: list[str] | None = None,
    on_event: EventCallback | None = None,
    libvirt_adopt: bool = False,
    convert_ram: str | None = None,
) -> UpgradeResult:
    """Move the running VM `source_spec` (PID, QMP socket path, or -name) into `target_binary`.

    `bandwidth` caps the copy in MiB/s (default unlimited); `timeout` bounds
    everything before switchover, in seconds; `downtime_limit` is QEMU's
    target for the final stop-and-copy, in ms; `overrides` are --set style
    "ID.KEY=VALUE" host-side changes for the destination; `force` names
    preflight checks (FORCEABLE) to override and known QEMU bugs
    (bugs.KNOWN_BUGS) whose risk the caller accepts. Raises a
    LiveUpgradeError subclass naming the cause; before switchover that means
    the VM still runs on the source, untouched. Cancelling the task before
    switchover rolls back; from switchover on, the upgrade completes first.
    If this process dies, its keeper finishes or rolls back the upgrade.
    `libvirt_adopt` opts in to upgrading a libvirt-managed VM by restarting
    the libvirt daemon around it (libvirt_domain.py, docs/libvirt.md).
    `convert_ram` ("memfd", a folder, or "" for the default) copies anonymous
    guest RAM onto shareable memory, so the next upgrade is zero-copy
    (ramconvert.py).
    """
    progress = _Progress(on_event or (lambda _e: None))
    requested = mode if isinstance(mode, Mode) else parse_mode(mode)
    parsed = [o if isinstance(o, Override) else Override.parse(o) for o in overrides or []]
    if timeout <= 0:
        raise UsageError("--timeout must be positive")
    forced = frozenset(force or [])
    _validate_force(forced)
    async with contextlib.AsyncExitStack() as held:  # released however the upgrade ends
        async with progress.phase("inspect", "reading the source VM"):
            proc = await asyncio.to_thread(source.resolve, source_spec)
            managed = libvirt_domain.find(proc.pid)
            tx = await _Transaction.open(held, proc)
            client: monitor.Monitor = await _connect_source(proc, managed)
            held.push_async_callback(_disconnect, client)
        async with progress.phase("plan", "probing the target QEMU and planning"):
            rundir = Path(tempfile.mkdtemp(prefix="upgrade-", dir=journal.runtime_base()))
            held.callback(shutil.rmtree, rundir, ignore_errors=True)
            tx.journal.record("planning", rundir=str(rundir))
            report = await _checked_plan(proc, client, Path(target_binary), requested, parsed,
                                         bandwidth, downtime_limit, forced, rundir, libvirt_adopt,
                                         convert_ram)
        assert report.transfer is not None
        tx.journal.facts["source"]["running"] = report.state.running
        tx.journal.facts.update(uuid=report.state.uuid, mode=report.transfer.mode.value,
                                target_binary=str(report.target.path))
        in_place = report.transfer.mode is Mode.CPR_EXEC
        undo = _Undo()
        try:
            async with asyncio.timeout(timeout):
                tx.ended = False  # from here on, something has changed until it is undone
                pause, client = await _pause_libvirt(progress, tx.journal, undo, proc, managed,
                                                     client)
                session = SourceSession(proc, report.state, client)
                held.push_async_callback(session.disconnect)
                undo.push("disconnect from the source", session.disconnect)  # before libvirt's
                undo.push("give the source back", session.give_back)
                if in_place:
                    await _rehearse(progress, tx, report, rundir)
                else:
                    async with progress.phase("destination", "starting the destination QEMU"):
                        destination = await _start_destination(tx.journal, undo, report,
                                                               rundir, managed)
                        held.push_async_callback(destination.disconnect)
                        # The keeper is armed since it was forked; confirm it runs before
                        # the migration (by now it has long started: waiting costs nothing).
                        await tx.keeper.armed()
                async with progress.phase("transfer", "transferring state "
                                          f"({report.transfer.mode.value})"):
                    if in_place:
                        await _exec_target(tx.journal, undo, session, report, rundir)
                    else:
                        await _transfer(tx.journal, undo, progress, session, destination, report)
            if not in_place:
                await _past_the_point_of_no_return(
                    _resume(progress, tx.journal, destination, report.state.running))
        except BaseException as e:  # errors, the timeout, cancellation (Ctrl-C, SIGTERM) alike
            progress.emit("rollback", "rolling back: the VM stays on the source")
            await undo.roll_back()
            tx.ended = not undo.failures
            if isinstance(e, TimeoutError):
                raise TransferFailed(
                    f"the upgrade did not reach switchover within {timeout:.0f} s; "
                    "the migration was cancelled and the VM runs on the source",
                    "raise --timeout, or --bandwidth / --downtime-limit") from None
            if undo.failures and isinstance(e, LiveUpgradeError):
                e.args = (f"{e}; the rollback did not complete ({'; '.join(undo.failures)}): "
                          "the keeper is repairing it", )
                e.fix = "; ".join(undo.fixes) or e.fix  # the rollback's own fix comes first
            raise
        # ---- point of no return: the guest runs on the destination from here ----
        undo.drop()
        try:
            result: UpgradeResult = await _past_the_point_of_no_return(
                _finish_in_place(progress, tx.journal, session, report, rundir) if in_place
                else _finish(progress, tx.journal, session, destination, report, pause))
        except SwitchoverFailed:
            tx.ended = True  # the guest runs on the new QEMU; the message says what is left
            raise
        tx.ended = True
        tx.result = result
        return result
    raise AssertionError("unreachable")  # for type checkers: the with block returns or raises


async def _disconnect(client: monitor.Monitor) -> None:
    with contextlib.suppress(Exception):
        await client.disconnect()


async def _past_the_point_of_no_return(finish: Coroutine[Any, Any, Any]) -> Any:
    """Run a step past the point of no return to its end even if cancelled meanwhile.

    Stopping halfway would leave the guest moved but the old QEMU alive or the
    sockets not in place; a cancellation that arrives now is absorbed, and the
    caller gets the finished step's result.
    """
    task = asyncio.ensure_future(finish)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()


async def _connect_source(proc: source.SourceProcess,
                          managed: libvirt_domain.LibvirtVM | None) -> monitor.Monitor:
    """The source's monitor: through libvirt when libvirt owns it, else the QMP socket."""
    if managed is not None:
        return await asyncio.to_thread(libvirt_domain.LibvirtMonitor, managed)
    return await source.connect_source(proc)


async def plan(source_spec: str | int, target_binary: str | Path, *,
               mode: str | Mode = Mode.AUTO, bandwidth: float | None = None,
               downtime_limit: int = 100, overrides: list[str] | None = None,
               force: list[str] | None = None, libvirt_adopt: bool = False,
               convert_ram: str | None = None) -> PlanReport:
    """Everything `upgrade` would check and do, without changing anything."""
    proc = await asyncio.to_thread(source.resolve, source_spec)
    client = await _connect_source(proc, libvirt_domain.find(proc.pid))
    try:
        return await make_plan(
            proc, client, Path(target_binary),
            requested=mode if isinstance(mode, Mode) else parse_mode(mode),
            overrides=[Override.parse(o) for o in overrides or []], bandwidth=bandwidth,
            downtime_limit=downtime_limit, forced=frozenset(force or []),
            libvirt_adopt=libvirt_adopt, convert_ram=convert_ram)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def _validate_force(names: frozenset[str]) -> None:
    valid = set(KNOWN_BUGS) | FORCEABLE
    unknown = names - valid
    if unknown:
        raise UsageError(f"--force {', '.join(sorted(unknown))}: no such check or known bug",
                         f"names that can be forced: {', '.join(sorted(valid))}")


async def make_plan(proc: source.SourceProcess, client: monitor.Monitor, binary: Path, *,
                    requested: Mode = Mode.AUTO, overrides: list[Override] | None = None,
                    bandwidth: float | None = None, downtime_limit: int = 100,
                    forced: frozenset[str] = frozenset(), rundir: Path | None = None,
                    libvirt_adopt: bool = False, convert_ram: str | None = None) -> PlanReport:
    """Run every preflight check and plan the destination; changes nothing."""
    _validate_force(forced)
    state = await source.query_state(client, proc.pid)
    info = await target.probe(binary)
    pf = Preflight()
    check_source(pf, state)
    if isinstance(client, libvirt_domain.LibvirtMonitor):
        libvirt_domain.check(pf, client, libvirt_adopt)
    check_target(pf, proc, state, state.arch, info)
    await check_roms(pf, client, proc, info)
    fds, access_problem = await _source_fds(client, proc)
    libvirt = isinstance(client, libvirt_domain.LibvirtMonitor)
    facts = ModeInputs(
        memory=layout(proc.cmdline), source_version=state.version,
        target_version=info.version, source_caps=state.capabilities,
        target_caps=info.capabilities, target_params=info.parameters,
        tcg=state.tcg, forced=forced,
        exec_blockers=tuple(cprexec.blockers(proc.cmdline, fds, libvirt)))
    ctx = await asyncio.to_thread(context.read_context, proc.pid)
    conversion = None
    if convert_ram is not None:
        requested, conversion = await _plan_conversion(
            pf, client, info, convert_ram, requested, libvirt,
            name=state.uuid or f"pid{proc.pid}", owner=ctx.uid)
    check_mode(pf, requested, facts)
    if conversion is not None and pf.mode is Mode.COPY:
        pf.reason = f"--convert-ram: {conversion.describe()}"
    transfer = destination = rebuild = exec_argv = None
    qmp_object = "monitor-qmp" in info.qom_types  # how the target takes the engine's monitor
    if pf.mode is not None:
        transfer = transfer_settings(pf.mode, pf.reason, facts, bandwidth_mib=bandwidth,
                                     downtime_limit_ms=downtime_limit)
        run = rundir or journal.runtime_base() / "upgrade-PLAN"
        rebuild = functools.partial(
            build_destination, proc.argv, target_binary=info.path, machine=state.machine,
            mode=pf.mode, rundir=run,
            overrides=overrides, token=secrets.token_hex(4), fds=fds,
            target_version=info.version, ram=conversion,
            qmp_object=qmp_object)
        destination = rebuild()
        if pf.mode is Mode.CPR_EXEC:
            exec_argv = cprexec.build_exec_argv(
                proc.argv, target_binary=info.path, machine=state.machine,
                target_version=info.version, state_path=cprexec.state_path(run),
                engine_qmp=cprexec.monitor_path(run), fds=fds, overrides=overrides,
                qmp_object=qmp_object)
        check_handover(pf, proc.cmdline, fds, destination, access_problem)
        _check_runnable(pf, ctx, info)
        check_host(pf, CommandLine.parse(destination.argv), state.ram_bytes,
                   destination.ram_files)
    for check in pf.checks:
        if check.name in forced and not check.ok:
            check.forced = True
    return PlanReport(proc, state, info, pf, transfer, destination, ctx,
                      None if rebuild is None else
                      lambda numbers, vhost, queues: rebuild(numbers=numbers, vhost_fds=vhost,
                                                             queue_fds=queues),
                      exec_argv)


LIBVIRT_SHARED_RAM = ("give the domain shareable RAM in its XML instead (<memoryBacking><source "
                      "type='memfd'/><access mode='shared'/></memoryBacking>, plus "
                      "aux-ram-share=on through <qemu:commandline> for cpr-transfer) and "
                      "restart it once")


async def _plan_conversion(pf: Preflight, client: monitor.Monitor, info: target.TargetInfo,
                           spec: str, requested: Mode, libvirt: bool, name: str, owner: int
                           ) -> tuple[Mode, ramconvert.RamConversion | None]:
    """--convert-ram: a copy onto shareable RAM, shown as the ram-conversion check."""
    if requested not in (Mode.AUTO, Mode.COPY):
        raise UsageError(f"--convert-ram copies the guest RAM: it cannot go with --mode "
                         f"{requested.value}", "leave --mode out, or use --mode copy")
    if libvirt:
        pf.add("ram-conversion", "libvirt VMs are not converted behind libvirt's back: its "
               "domain XML would still say anonymous RAM, and the next start from it would "
               "undo the conversion", "", LIBVIRT_SHARED_RAM)
        return Mode.COPY, None
    memdevs = await monitor.execute(client, "query-memdev", what="source")
    try:
        conversion = ramconvert.plan(spec or ramconvert.default_spec(info.version), memdevs,
                                     info.version, name, owner)
    except Refused as e:
        pf.add("ram-conversion", str(e), "", e.fix)
        return Mode.COPY, None
    pf.add("ram-conversion", None, conversion.describe())
    return Mode.COPY, conversion


def _check_runnable(pf: Preflight, ctx: context.SourceContext, info: target.TargetInfo) -> None:
    """The destination runs as the source's user (libvirt: libvirt-qemu): can it run --to?"""
    paths = [str(info.path)] + ([info.real_exe] if info.real_exe else [])
    blocked = context.runnable_by(ctx, paths)
    pf.add("target-access",
           f"the VM's QEMU runs as uid {ctx.uid} gid {ctx.gid}, which cannot execute "
           f"{', '.join(blocked)}" if blocked else None,
           f"the new QEMU can run as the VM's user ({ctx.describe()})",
           "install the new QEMU where that user can reach it (a world-traversable "
           "folder such as /usr or /opt)")


async def _source_fds(client: monitor.Monitor, proc: source.SourceProcess
                      ) -> tuple[handover.SourceFds, str | None]:
    """The source's taps and listening sockets, and why they could not be taken (or None)."""
    info = ""
    if any(handover.is_tap(o) for o in proc.cmdline.options):
        info = await monitor.execute(client, "human-monitor-command",
                                     {"command-line": "info network"}, what="source")
    try:
        fds = await asyncio.to_thread(handover.gather, proc.pid, proc.cmdline, str(info))
    except OSError as e:
        return handover.SourceFds(), (f"cannot read the descriptors of PID {proc.pid}: "
                                      f"{e.strerror}; run liveupgrade as root")
    return fds, await asyncio.to_thread(fdpass.can_take_fds, proc.pid)


async def _checked_plan(proc: source.SourceProcess, client: monitor.Monitor, binary: Path,
                        requested: Mode, overrides: list[Override], bandwidth: float | None,
                        downtime_limit: int, forced: frozenset[str], rundir: Path,
                        libvirt_adopt: bool, convert_ram: str | None) -> PlanReport:
    """make_plan, refusing unless every check passed (or was forced)."""
    report = await make_plan(proc, client, binary, requested=requested, overrides=overrides,
                             bandwidth=bandwidth, downtime_limit=downtime_limit, forced=forced,
                             rundir=rundir, libvirt_adopt=libvirt_adopt,
                             convert_ram=convert_ram)
    if not report.ok:
        first = report.preflight.failures[0] if report.preflight.failures else None
        if first is not None and first.name == "target-arch":
            raise TargetBinaryError(first.detail, first.fix)
        raise report.refusal()
    return report


async def _pause_libvirt(progress: _Progress, txn: journal.Journal, undo: _Undo,
                         proc: source.SourceProcess, managed: libvirt_domain.LibvirtVM | None,
                         client: monitor.Monitor
                         ) -> tuple[libvirt_domain.LibvirtPause | None, monitor.Monitor]:
    """For a libvirt VM: stop the daemon, and talk to the source's monitor ourselves.

    The monitor is taken before the destination starts, because the
    destination will serve the same listening socket. Returns the pause (None
    for other VMs) and the source's monitor to use from now on.
    """
    if managed is None:
        return None, client
    async with progress.phase("libvirt", "stopping the libvirt daemon"):
        pause = libvirt_domain.LibvirtPause.prepare(managed)
        txn.record("libvirt-stopping", libvirt=pause.to_json())
        await client.disconnect()  # libvirt's pass-through: its daemon is going away
        running = bool(txn.facts["source"]["running"])
        undo.push("start the libvirt daemon", lambda: pause.give_back(proc.pid, running))
        await pause.stop()
        return pause, await monitor.connect_new(proc.qmp_path, f"source-{proc.pid}")


async def _start_destination(txn: journal.Journal, undo: _Undo, report: PlanReport,
                             rundir: Path, managed: libvirt_domain.LibvirtVM | None
                             ) -> Destination:
    """Start the new QEMU paused on duplicates of the source's taps and listening sockets."""
    assert report.destination and report.rebuild and report.context and report.transfer
    src, transfer = report.vm, report.transfer
    taken = fdpass.take_fds(src.pid, report.destination.inherited_fds)
    vhost: dict[str, int] = {}
    queues: dict[str, list[int]] = {}
    try:
        vhost.update(fdpass.open_vhost_net(src.pid, report.destination.vhost_netdevs))
        for ident, source_queues in report.destination.mq_netdevs.items():
            queues[ident] = fdpass.open_tap_queues(src.pid, source_queues[0],
                                                   len(source_queues))
    except BaseException:
        fdpass.close_all([*taken.values(), *vhost.values(), *_flat(queues)])
        raise
    try:
        # The same plan, with the descriptors numbered as this process holds them.
        plan = report.rebuild(taken, vhost, queues)
        private_dirs = [rel.private.parent for rel in plan.relocations]
        for folder in private_dirs:
            folder.mkdir(mode=0o700, exist_ok=True)
        undo.push("remove private paths",
                  lambda: asyncio.to_thread(_remove_all, private_dirs))
        _own_by(report.context, [rundir, *private_dirs])
        if plan.ram_files:  # --convert-ram into files: the folder, and no file left on undo
            ram_dir = plan.ram_files[0].parent
            if not ram_dir.exists():
                ram_dir.mkdir(mode=0o700)
                _own_by(report.context, [ram_dir])
            undo.push("remove the converted RAM files",
                      lambda: asyncio.to_thread(_unlink_all, plan.ram_files))
        destination = Destination(plan, rundir)
        undo.push("kill the destination", destination.kill)
        vnc = plan.vnc
        # What a repair must put back if this process dies while the destination starts:
        # it resets the taps' header size, which only our guard restores meanwhile.
        tap_fds = [*plan.tap_fds, *(q[0] for q in report.destination.mq_netdevs.values())]
        headers = fdpass.vnet_header_sizes(src.pid, tap_fds) if tap_fds else {}
        txn.record("destination-starting", ram_files=[str(f) for f in plan.ram_files],
                   vnet_header_sizes={str(fd): size for fd, size in headers.items()},
                   relocations=[
            {"private": str(r.private), "original": str(r.original), "kind": r.kind}
            for r in plan.relocations],
            vnc={"display": vnc.display, "address": vnc.address} if vnc else None)
        log, log_fd = DestinationLog.open(plan, rundir, src.pid,
                                          managed.log_path if managed else None)
        try:
            await destination.start(taken, report.context,
                                    target.clean_env(src.environ if managed else None),
                                    log, log_fd, also=[*vhost.values(), *_flat(queues)],
                                    guard=[fds[0] for fds in queues.values()])
        finally:
            os.close(log_fd)
    finally:
        fdpass.close_all([*taken.values(), *vhost.values(), *_flat(queues)])
    txn.record("destination-started", destination={
        "pid": destination.pid, "create_time": procs.create_time(destination.pid),
        "qmp_path": str(plan.qmp_path)})
    if transfer.mode is Mode.CPR_TRANSFER:
        assert plan.cpr_path
        await destination.wait_for_path(plan.cpr_path)  # its monitor waits for the cpr channel
        await destination.release_taps()  # it opens its netdevs only after the source stopped
        return destination
    await destination.connect(transfer.target_caps, transfer.target_params)
    await destination.release_taps()  # netdevs set up: only loading the NIC touches them now
    await monitor.execute(destination.qmp, "migrate-incoming",  # type: ignore[arg-type]
                          {"uri": f"unix:{plan.migrate_path}"}, what="destination")
    return destination


async def _rehearse(progress: _Progress, tx: _Transaction, report: PlanReport,
                   rundir: Path) -> None:
    """cpr-exec has no second process to fall back to once the VM's process has exec'd,
    so the new QEMU is first started on this VM's own command line (paused, on
    duplicates of its taps and sockets, as in the other modes) and stopped again:
    an option, device or machine type the target refuses fails here, harmlessly."""
    async with progress.phase("destination", "rehearsing: starting the new QEMU on this VM's "
                              "command line, then stopping it"):
        trial = _Undo()
        try:
            await _start_destination(tx.journal, trial, report, rundir, None)
        finally:
            await trial.roll_back()
        if trial.failures:
            raise DestinationFailed("the rehearsal QEMU could not be cleaned up: "
                                    + "; ".join(trial.failures))
        await tx.keeper.armed()


async def _exec_target(txn: journal.Journal, undo: _Undo, session: SourceSession,
                       report: PlanReport, rundir: Path) -> None:
    """cpr-exec: save the device state to a private file; the VM's process execs the new
    QEMU. Returns once the old image is gone; raises (the guest runs on, on the old
    binary) if QEMU could not exec it."""
    assert report.transfer and report.exec_argv
    transfer = report.transfer
    params = {**transfer.source_params, "cpr-exec-command": report.exec_argv}
    session.note_migration(transfer.source_caps, params)
    txn.record("migrating", source_caps=session.caps, params_before=session.params_before,
               target_caps=[])
    undo.push("cancel the migration", session.cancel_migration)
    await session.set_migration(transfer.source_caps, params)
    txn.record("exec", exec_qmp=str(cprexec.monitor_path(rundir)),
               state_file=str(cprexec.state_path(rundir)))
    # From `migrate` on, only QEMU's answer decides: the exec happened or it did not.
    await _past_the_point_of_no_return(_migrate_and_exec(session.client, rundir))


async def _migrate_and_exec(client: monitor.Monitor, rundir: Path) -> None:
    await monitor.execute(client, "migrate", {"uri": f"file:{cprexec.state_path(rundir)}"},
                          what="source")
    await cprexec.await_exec(client)


async def _finish_in_place(progress: _Progress, txn: journal.Journal, session: SourceSession,
                           report: PlanReport, rundir: Path) -> UpgradeResult:
    """After the exec: the new image loads the state and resumes by itself; wait for it on
    its private monitor and check it is the wanted QEMU."""
    proc, state = report.vm, report.state
    assert report.transfer
    txn.record("switchover")
    async with progress.phase("switchover", "the new QEMU loads the VM state and resumes it"):
        client = await cprexec.reconnect(proc.pid, proc.create_time,
                                         cprexec.monitor_path(rundir), state.running)
        resumed_wall = time.time()
    try:
        with contextlib.suppress(OSError):
            txn.record("resumed")
        status: Any = await monitor.execute(client, "query-status", what="new QEMU")
        version: Any = await monitor.execute(client, "query-version", what="new QEMU")
    finally:
        await _disconnect(client)
    await session.disconnect()
    stopped = session.stopped_at()
    got = version["qemu"]
    if (got["major"], got["minor"]) != (report.target.version.major,
                                        report.target.version.minor):
        raise SwitchoverFailed(f"after the exec PID {proc.pid} runs QEMU {got['major']}."
                               f"{got['minor']}, not the target {report.target.version}",
                               "check what the target path runs")
    return _result(
        report, progress, proc.pid, bool(status["running"]),
        # An upper bound: from the old image's STOP event to the moment the engine saw
        # the new one running (it cannot hear the new image's RESUME event).
        vcpu_pause_ms=round((resumed_wall - stopped) * 1e3, 2) if stopped else None,
        ram_transferred_bytes=0, destination_argv=report.exec_argv or [], handed_over=[
            f"the VM kept PID {proc.pid}: its process exec'd the new QEMU (cpr-exec)",
            "taps kept their descriptors; listening sockets were bound again by the new "
            "QEMU at the same paths"])


def _flat(queues: dict[str, list[int]]) -> list[int]:
    return [fd for fds in queues.values() for fd in fds]


def _unlink_all(files: list[Path]) -> None:
    for file in files:
        file.unlink(missing_ok=True)


def _remove_all(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _own_by(ctx: context.SourceContext, dirs: list[Path]) -> None:
    """Private folders the destination creates sockets in belong to the user it runs as."""
    if ctx.uid != os.geteuid() or ctx.gid != os.getegid():
        for d in dirs:
            os.chown(d, ctx.uid, ctx.gid)


async def _transfer(txn: journal.Journal, undo: _Undo, progress: _Progress,
                    session: SourceSession, destination: Destination, report: PlanReport) -> None:
    assert report.transfer
    plan, transfer = destination.plan, report.transfer
    session.note_migration(transfer.source_caps, transfer.source_params)
    txn.record("migrating", source_caps=session.caps, params_before=session.params_before,
               target_caps=list(transfer.target_caps))
    undo.push("cancel the migration", session.cancel_migration)
    await session.set_migration(transfer.source_caps, transfer.source_params)
    main = {"transport": "socket", "type": "unix", "path": str(plan.migrate_path)}
    if transfer.mode is Mode.CPR_TRANSFER:
        assert plan.cpr_path
        cpr = {"transport": "socket", "type": "unix", "path": str(plan.cpr_path)}
        await monitor.execute(session.client, "migrate", {"channels": [
            {"channel-type": "main", "addr": main}, {"channel-type": "cpr", "addr": cpr}]},
            what="source")
        await destination.connect(transfer.target_caps, transfer.target_params)
        await monitor.execute(destination.qmp, "migrate-incoming",  # type: ignore[arg-type]
                              {"channels": [{"channel-type": "main", "addr": main}]},
                              what="destination")
    else:
        await monitor.execute(session.client, "migrate", {"uri": f"unix:{plan.migrate_path}"},
                              what="source")
    await _await_completion(progress, session, destination)


async def _await_completion(progress: _Progress, session: SourceSession,
                            destination: Destination) -> None:
    """Follow the migration until the destination has loaded the whole VM state.

    The destination's MIGRATION event says "completed" the moment it can run
    the guest, and it is awaited directly: the source's progress is polled by
    a task of its own, so a poll waiting on a source busy finishing the
    migration never delays the reaction (measured: it added up to 20 ms to
    the vCPU pause). When the migration fails, the cause quoted is the dying
    side's own: the destination's log if it exited, else the source's error.
    """
    stop = asyncio.Event()
    follower = asyncio.ensure_future(_follow_source(progress, session, destination, stop))
    session.follower = follower  # finished before the session lets go of its monitor
    outcome = asyncio.ensure_future(_destination_outcome(destination))
    try:
        done, _ = await asyncio.wait({follower, outcome}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()  # the follower ends after its current poll; cancelling it would drop a reply
        outcome.cancel()
    if outcome in done:
        outcome.result()  # completed, or the destination's failure
    else:
        follower.result()  # the source's failure


async def _destination_outcome(destination: Destination) -> None:
    """Return when the destination has the whole VM state; raise when it failed or died."""
    assert destination.events is not None and destination.proc is not None
    exited = asyncio.ensure_future(destination.proc.wait())
    try:
        while True:
            event = asyncio.ensure_future(destination.events.get())
            await asyncio.wait({event, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                raise DestinationFailed(f"the destination QEMU exited during the transfer with "
                                        f"{destination.exited}: {destination.why()}")
            data: Any = dict(event.result()).get("data") or {}
            if data.get("status") == "completed":
                return
            if data.get("status") == "failed":
                raise DestinationFailed("the destination failed to load the VM state: "
                                        f"{destination.why()}")
    finally:
        exited.cancel()


async def _follow_source(progress: _Progress, session: SourceSession, destination: Destination,
                         stop: asyncio.Event) -> None:
    """Report the source's progress until told to stop; raise when its migration failed."""
    while not stop.is_set():
        info = await monitor.execute(session.client, "query-migrate", what="source")
        if stop.is_set():
            return
        src_status = info.get("status")
        ram = info.get("ram") or {}
        progress.emit("progress", f"migration {src_status}",
                      ram_transferred=ram.get("transferred"), ram_total=ram.get("total"))
        if src_status in ("failed", "cancelled"):
            dying = await destination.failure()
            if dying is not None:
                raise DestinationFailed(f"the destination rejected the VM state: {dying}",
                                        "the VM still runs on the source; see the cause above")
            raise TransferFailed(f"the migration {src_status}: "
                                 f"{info.get('error-desc') or 'QEMU gave no reason'}",
                                 "the VM still runs on the source; see the cause above")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROGRESS_INTERVAL)


async def _resume(progress: _Progress, txn: journal.Journal, destination: Destination,
                  running: bool) -> None:
    """The switchover: resume the guest on the destination (if it ran on the source).

    Recorded before `cont` is sent: from here a repair asks the destination
    itself whether it holds the VM. A `cont` QEMU refuses means the
    destination never ran the guest: the caller rolls back. Once `cont` has
    succeeded nothing may roll back (the destination ran the guest), so
    nothing else happens in here.
    """
    async with progress.phase("switchover", "resuming the guest on the destination"):
        txn.record("switchover")
        if running:
            try:
                await monitor.execute(destination.qmp, "cont",  # type: ignore[arg-type]
                                      what="destination")
            except MonitorError as e:
                raise TransferFailed(f"the destination would not resume the guest: {e}; "
                                     "the VM runs on the source") from e
        # Never a reason to roll back now: without this record the journal still says
        # switchover, and a repair asks the destination, which runs the guest.
        with contextlib.suppress(OSError):
            txn.record("resumed")


async def _finish(progress: _Progress, txn: journal.Journal, session: SourceSession,
                  destination: Destination, report: PlanReport,
                  pause: libvirt_domain.LibvirtPause | None) -> UpgradeResult:
    """Past the point of no return: retire the source, put its paths and display in place."""
    plan, state, proc = destination.plan, report.state, report.vm
    assert report.transfer
    status: dict[str, Any] = await monitor.execute(
        destination.qmp, "query-status", what="destination")  # type: ignore[arg-type]
    migration: dict[str, Any] = await monitor.execute(session.client, "query-migrate",
                                                      what="source")
    stopped, resumed = session.stopped_at(), destination.resumed_at()
    vcpu_pause = (round((resumed - stopped) * 1e3, 2)
                  if stopped is not None and resumed is not None else None)
    vnc_fds = _take_vnc(plan, proc.pid)
    async with progress.phase("retire", "stopping the old QEMU"):
        await session.disconnect()
        killed_at = time.monotonic()
        await retire_source(proc.pid, proc.create_time)
    async with progress.phase("relocate", "moving sockets, display and pidfile into place"):
        txn.record("relocating")
        notes = await _hand_over_vnc(destination, vnc_fds)
        moved, failed = move_into_place(plan.relocations, killed_at)
        notes += await reset_on_new_qemu(destination.qmp,  # type: ignore[arg-type]
                                         list(report.transfer.target_caps))
    if pause is not None:
        async with progress.phase("adopt", "handing the new QEMU back to libvirt"):
            txn.record("adopting")
            notes += await pause.adopt(destination.pid, str(report.target.path), state.running)
    if failed:
        raise SwitchoverFailed(
            "the guest runs on the new QEMU, but these paths could not be moved into place: "
            + "; ".join(failed), "move them by hand; the new QEMU listens on the private paths")
    m = migration
    return _result(
        report, progress, destination.pid, bool(status["running"]),
        downtime_ms=m.get("downtime"), vcpu_pause_ms=vcpu_pause,
        total_time_ms=m.get("total-time"), setup_time_ms=m.get("setup-time"),
        ram_transferred_bytes=(m.get("ram") or {}).get("transferred"),
        bytes_transferred=(m.get("ram") or {}).get("total"),
        destination_argv=plan.argv, moved_paths=moved, handed_over=plan.handed_over + notes)


def _result(report: PlanReport, progress: _Progress, new_pid: int, running: bool,
            **figures: Any) -> UpgradeResult:
    """What every mode reports alike; `figures` are the mode's own."""
    state, transfer = report.state, report.transfer
    assert transfer
    return UpgradeResult(
        name=state.name, uuid=state.uuid, machine=state.machine, mode=transfer.mode.value,
        mode_reason=transfer.reason, source_pid=report.vm.pid, destination_pid=new_pid,
        source_version=str(state.version), target_version=str(report.target.version),
        target_binary=str(report.target.path), guest_running=running,
        phases_ms=dict(progress.phases_ms), **figures)


def _take_vnc(plan: DestinationPlan, source_pid: int) -> dict[int, int]:
    """Duplicate the source's VNC listening sockets before it is killed."""
    vnc = plan.vnc
    if vnc is None or not vnc.source_fds:
        return {}
    try:
        return fdpass.take_fds(source_pid, list(vnc.source_fds))
    except fdpass.FdAccessError:
        return {}  # fall back to rebinding the address once the source is gone


async def _hand_over_vnc(destination: Destination, taken: dict[int, int]) -> list[str]:
    """Point the destination's VNC at the source's listening sockets (or its address).

    Past the point of no return: a failure is reported, never raised, since
    the guest runs on the destination whatever happens to the display.
    """
    vnc, client = destination.plan.vnc, destination.qmp
    if vnc is None or client is None:
        return []
    try:
        if not taken:
            return [await rebind_vnc(client, vnc.display, vnc.address)]
        names = []
        for index, fd in enumerate(taken.values()):
            name = f"liveupgrade-vnc{index}"
            client.send_fd_scm(fd)
            await client.execute("getfd", {"fdname": name})
            names.append({"type": "fd", "str": name})
        await client.execute("display-update", {"type": "vnc", "addresses": names})
        return [f"VNC {vnc.display}: took over the source's listening socket(s)"]
    except Exception as e:
        return [f"VNC {vnc.display}: NOT handed over ({e}); the display stays on the "
                "destination's private socket"]
    finally:
        fdpass.close_all(taken.values())


__all__ = ["LiveUpgradeError", "PlanReport", "UpgradeEvent", "UpgradeResult", "plan", "upgrade"]
