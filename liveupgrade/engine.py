"""The upgrade engine: explicit phases, each able to undo itself.

    inspect -> plan -> start destination -> transfer -> | switchover -> retire source -> relocate
                                                        ^ point of no return

Until the destination runs the guest, the source is authoritative: any
error, a timeout, or cancellation (Ctrl-C, SIGTERM) cancels the migration,
makes sure the source runs exactly as before, and kills the destination.
Only one copy of the guest ever runs: the destination is started with -S
and is resumed only after the source has stopped in migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import QMPClient
from qemu.qmp.events import EventListener

from liveupgrade import context, fdpass, handover, libvirt_domain, monitor, source, target
from liveupgrade.bugs import KNOWN_BUGS
from liveupgrade.cmdline import CommandLine
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
from liveupgrade.memory import layout
from liveupgrade.modes import Mode, ModeInputs, Transfer, parse_mode, transfer_settings
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
from liveupgrade.report import UpgradeEvent, UpgradeResult

EventCallback = Callable[[UpgradeEvent], None]
ACTIVE_STATES = {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling"}
PROGRESS_INTERVAL = 0.1
DESTINATION_START_TIMEOUT = 30.0
SOURCE_EXIT_TIMEOUT = 10.0


def runtime_base() -> Path:
    """Where private run folders go: /run/liveupgrade as root, else XDG_RUNTIME_DIR or /tmp.

    /run/liveupgrade is 0711: a destination running as the VM's own user
    (libvirt's libvirt-qemu) may pass through it to its run folder, which is
    0700 and owned by that user, but cannot list or enter the others.
    """
    if os.geteuid() == 0 and Path("/run").is_dir():
        base = Path("/run/liveupgrade")
        base.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(base, 0o711)
        return base
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


@dataclass
class _Run:
    """The state one upgrade accumulates as its phases run."""

    on_event: EventCallback
    phases_ms: dict[str, float] = field(default_factory=dict)
    src: source.SourceProcess | None = None
    src_qmp: monitor.Monitor | None = None
    state: source.SourceState | None = None
    info: target.TargetInfo | None = None
    transfer: Transfer | None = None
    plan: DestinationPlan | None = None
    rebuild: Callable[[dict[int, int]], DestinationPlan] | None = None
    context: context.SourceContext | None = None
    rundir: Path | None = None
    stderr_path: Path | None = None
    stderr_offset: int = 0
    tap_guard: asyncio.Task[None] | None = None
    source_killed_at: float | None = None
    libvirt: libvirt_domain.LibvirtVM | None = None  # set when libvirt manages the VM
    daemon: libvirt_domain.Daemon | None = None  # stopped by us, to be started again
    dst_proc: asyncio.subprocess.Process | None = None
    dst_qmp: QMPClient | None = None
    dst_events: EventListener | None = None
    migration: dict[str, Any] = field(default_factory=dict)

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
    `libvirt_adopt` opts in to upgrading a libvirt-managed VM by restarting
    the libvirt daemon around it (libvirt_domain.py, docs/libvirt.md).
    """
    run = _Run(on_event or (lambda _e: None))
    requested = mode if isinstance(mode, Mode) else parse_mode(mode)
    parsed = [o if isinstance(o, Override) else Override.parse(o) for o in overrides or []]
    if timeout <= 0:
        raise UsageError("--timeout must be positive")
    _validate_force(frozenset(force or []))
    try:
        async with run.phase("inspect", "reading the source VM"):
            await _inspect(run, source_spec)
        async with run.phase("plan", "probing the target QEMU and planning"):
            await _plan(run, Path(target_binary), requested, parsed, bandwidth, downtime_limit,
                        frozenset(force or []), libvirt_adopt)
        try:
            async with asyncio.timeout(timeout):
                if run.libvirt is not None:
                    async with run.phase("libvirt", "stopping the libvirt daemon"):
                        await _take_from_libvirt(run)
                async with run.phase("destination", "starting the destination QEMU"):
                    await _start_destination(run)
                async with run.phase("transfer", f"transferring state ({run.transfer.mode.value})"):  # type: ignore[union-attr]
                    await _transfer(run)
        except TimeoutError:
            await _rollback(run)
            raise TransferFailed(f"the upgrade did not reach switchover within {timeout:.0f} s; "
                                 "the migration was cancelled and the VM runs on the source",
                                 "raise --timeout, or --bandwidth / --downtime-limit") from None
        except BaseException:  # errors and cancellation (Ctrl-C, SIGTERM) alike
            await asyncio.shield(_rollback(run))
            raise
        return await _past_the_point_of_no_return(_finish(run))
    finally:
        await _release_taps(run)
        for client in (run.src_qmp, run.dst_qmp):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.disconnect()


async def _past_the_point_of_no_return(finish: Awaitable[UpgradeResult]) -> UpgradeResult:
    """Run the switchover to its end even if cancelled meanwhile.

    Stopping halfway would leave the guest moved but the old QEMU alive or the
    sockets not in place; a cancellation that arrives now is absorbed, and the
    caller gets the finished upgrade's result.
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


async def _inspect(run: _Run, spec: str | int) -> None:
    run.src = await asyncio.to_thread(source.resolve, spec)
    run.libvirt = libvirt_domain.find(run.src.pid)
    run.src_qmp = await _connect_source(run.src, run.libvirt)


async def _connect_source(proc: source.SourceProcess,
                          managed: libvirt_domain.LibvirtVM | None) -> monitor.Monitor:
    """The source's monitor: through libvirt when libvirt owns it, else the QMP socket."""
    if managed is not None:
        return await asyncio.to_thread(libvirt_domain.LibvirtMonitor, managed)
    return await source.connect_source(proc)


@dataclass
class PlanReport:
    """What `plan` shows and `upgrade` acts on: the checks, the mode, the destination."""

    vm: source.SourceProcess
    state: source.SourceState
    target: target.TargetInfo
    preflight: Preflight
    transfer: Transfer | None
    destination: DestinationPlan | None
    context: context.SourceContext | None = None
    # The same destination with the source fds renumbered as the engine holds them.
    rebuild: Callable[[dict[int, int]], DestinationPlan] | None = None

    @property
    def ok(self) -> bool:
        return not self.preflight.failures and self.destination is not None

    def refusal(self) -> Refused:
        failures = self.preflight.failures
        lines = [f"{c.name}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "")
                 for c in failures]
        forceable = [c.name for c in failures if c.forceable]
        fix = "fix the failed checks"
        if forceable:
            fix += f"; or accept the risk with --force {' --force '.join(forceable)}"
        return Refused("preflight checks failed: " + "; ".join(lines), fix)


    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "pid": self.vm.pid, "name": self.state.name, "uuid": self.state.uuid,
            "machine": self.state.machine, "source_version": str(self.state.version),
            "target_version": str(self.target.version), "target_binary": str(self.target.path),
            "mode": self.preflight.mode.value if self.preflight.mode else None,
            "mode_reason": self.preflight.reason,
            "checks": [c.to_json() for c in self.preflight.checks],
            "destination_argv": self.destination.argv if self.destination else None,
            "relocations": [{"private": str(r.private), "original": str(r.original),
                             "kind": r.kind} for r in self.destination.relocations]
            if self.destination else [],
            "inherited_fds": self.destination.inherited_fds if self.destination else [],
            "handed_over": self.destination.handed_over if self.destination else [],
        }

    def render(self) -> str:
        lines = [f"plan for {self.state.name or self.state.uuid} (PID {self.vm.pid}): "
                 f"QEMU {self.state.version} -> {self.target.version} at {self.target.path}",
                 f"mode: {self.preflight.mode.value if self.preflight.mode else 'none'}"
                 f"{' (' + self.preflight.reason + ')' if self.preflight.reason else ''}",
                 "checks:"]
        for c in self.preflight.checks:
            verdict = "PASS" if c.ok else ("FORCED" if c.forced else "FAIL")
            lines.append(f"  {verdict:<6} {c.name:<26} {c.detail}")
            if c.fix and not c.ok:
                lines.append(f"  {'':<6} {'':<26} fix: {c.fix}"
                             + ("" if c.forceable else " (cannot be forced)"))
        if self.destination:
            lines += ["destination command line (the run folder is created at upgrade time):",
                      "  " + shlex.join(self.destination.argv)]
            if self.destination.inherited_fds:
                lines.append("fd=N above are the old QEMU's descriptors "
                             f"{', '.join(map(str, self.destination.inherited_fds))}, "
                             "duplicated (pidfd_getfd) and passed at start:")
                lines += [f"  {item}" for item in self.destination.handed_over]
            if self.destination.relocations:
                lines.append("moved into place after the old QEMU exits:")
                lines += [f"  {r.private} -> {r.original}" for r in self.destination.relocations]
        lines.append("verdict: " + ("the upgrade can proceed" if self.ok else
                                    "the upgrade would be refused"))
        return "\n".join(lines)


async def plan(source_spec: str | int, target_binary: str | Path, *,
               mode: str | Mode = Mode.AUTO, bandwidth: float | None = None,
               downtime_limit: int = 100, overrides: list[str] | None = None,
               force: list[str] | None = None, libvirt_adopt: bool = False) -> PlanReport:
    """Everything `upgrade` would check and do, without changing anything."""
    proc = await asyncio.to_thread(source.resolve, source_spec)
    client = await _connect_source(proc, libvirt_domain.find(proc.pid))
    try:
        return await make_plan(
            proc, client, Path(target_binary),
            requested=mode if isinstance(mode, Mode) else parse_mode(mode),
            overrides=[Override.parse(o) for o in overrides or []], bandwidth=bandwidth,
            downtime_limit=downtime_limit, forced=frozenset(force or []),
            libvirt_adopt=libvirt_adopt)
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
                    libvirt_adopt: bool = False) -> PlanReport:
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
    facts = ModeInputs(
        memory=layout(proc.cmdline), source_version=state.version,
        target_version=info.version, source_caps=state.capabilities,
        target_caps=info.capabilities, target_params=info.parameters,
        tcg=state.tcg, forced=forced)
    check_mode(pf, requested, facts)
    transfer = destination = rebuild = None
    fds, access_problem = await _source_fds(client, proc)
    ctx = await asyncio.to_thread(context.read_context, proc.pid)
    if pf.mode is not None:
        transfer = transfer_settings(pf.mode, pf.reason, facts, bandwidth_mib=bandwidth,
                                     downtime_limit_ms=downtime_limit)
        rebuild = functools.partial(
            build_destination, proc.argv, target_binary=info.path, machine=state.machine,
            mode=pf.mode, rundir=rundir or runtime_base() / "upgrade-PLAN",
            overrides=overrides, token=secrets.token_hex(4), fds=fds,
            target_version=info.version)
        destination = rebuild()
        check_handover(pf, proc.cmdline, fds, destination, access_problem)
        _check_runnable(pf, ctx, info)
        check_host(pf, CommandLine.parse(destination.argv), state.ram_bytes)
    for check in pf.checks:
        if check.name in forced and not check.ok:
            check.forced = True
    return PlanReport(proc, state, info, pf, transfer, destination, ctx,
                      None if rebuild is None else lambda numbers: rebuild(numbers=numbers))


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


async def _plan(run: _Run, binary: Path, requested: Mode, overrides: list[Override],
                bandwidth: float | None, downtime_limit: int, forced: frozenset[str],
                libvirt_adopt: bool) -> None:
    assert run.src and run.src_qmp
    rundir = Path(tempfile.mkdtemp(prefix="upgrade-", dir=runtime_base()))
    try:
        report = await make_plan(run.src, run.src_qmp, binary, requested=requested,
                                 overrides=overrides, bandwidth=bandwidth,
                                 downtime_limit=downtime_limit, forced=forced, rundir=rundir,
                                 libvirt_adopt=libvirt_adopt)
        if not report.ok:
            first = report.preflight.failures[0] if report.preflight.failures else None
            if first is not None and first.name == "target-arch":
                raise TargetBinaryError(first.detail, first.fix)
            raise report.refusal()
    except BaseException:
        shutil.rmtree(rundir, ignore_errors=True)
        raise
    run.rundir, run.state, run.info = rundir, report.state, report.target
    run.transfer, run.plan = report.transfer, report.destination
    run.rebuild, run.context = report.rebuild, report.context
    assert run.transfer is not None
    run.emit("plan", f"mode {run.transfer.mode.value}: {run.transfer.reason}")


async def _take_from_libvirt(run: _Run) -> None:
    """Stop the libvirt daemon and talk to the source's monitor ourselves.

    With the daemon down nobody can start a second copy of the VM, and no
    daemon sees the old QEMU exit after switchover (it would clean up under
    the guest). The monitor is taken before the destination starts, because
    the destination will serve the same listening socket.
    """
    assert run.src and run.src_qmp
    daemon = libvirt_domain.Daemon.find()
    if daemon is None:
        raise libvirt_domain.LibvirtError("the libvirt daemon disappeared during the upgrade")
    await run.src_qmp.disconnect()
    run.src_qmp = None
    run.daemon = daemon
    await daemon.stop()
    run.src_qmp = await monitor.connect_new(run.src.qmp_path, f"source-{run.src.pid}")


async def _give_back_to_libvirt(run: _Run) -> None:
    """Rollback: start the daemon again on the untouched status; it finds the source."""
    if run.daemon is None or run.libvirt is None or run.src is None:
        return
    if run.src_qmp is not None:
        with contextlib.suppress(Exception):
            await run.src_qmp.disconnect()
        run.src_qmp = None
    daemon, run.daemon = run.daemon, None
    await daemon.start()
    running = run.state.running if run.state else True
    await (await libvirt_domain.wait_running_on(run.libvirt, run.src.pid, running)).disconnect()


async def _adopt(run: _Run) -> list[str]:
    """After switchover: point libvirt's status at the new QEMU and start the daemon."""
    assert run.libvirt and run.daemon and run.dst_proc and run.info and run.state
    libvirt_domain.point_status_at(run.libvirt, run.dst_proc.pid, str(run.info.path))
    daemon, run.daemon = run.daemon, None
    await daemon.start()
    mon = await libvirt_domain.wait_running_on(run.libvirt, run.dst_proc.pid, run.state.running)
    try:
        version = await monitor.execute(mon, "query-version", what="the new QEMU via libvirt")
    finally:
        await mon.disconnect()
    q = version["qemu"]
    return [f"libvirt: {run.libvirt.describe()} adopted by {daemon.name}: running on PID "
            f"{run.dst_proc.pid}, QEMU {q['major']}.{q['minor']}.{q['micro']} answers "
            "through libvirt"]


async def _start_destination(run: _Run) -> None:
    assert run.plan and run.transfer and run.rundir and run.src and run.rebuild and run.context
    # The source's taps and listening sockets, duplicated into this process and
    # passed to the destination under the numbers we hold them by.
    taken = fdpass.take_fds(run.src.pid, run.plan.inherited_fds)
    joiner: context.Joiner | None = None
    try:
        plan = run.plan = run.rebuild(taken)
        transfer = run.transfer
        for rel in plan.relocations:
            rel.private.parent.mkdir(mode=0o700, exist_ok=True)
        _own_by(run.context, [run.rundir, *(rel.private.parent for rel in plan.relocations)])
        joiner = context.Joiner(run.context)
        log = _destination_stderr(run)
        if plan.tap_fds:
            guard = fdpass.VnetHeaderGuard([taken[fd] for fd in plan.tap_fds])
            run.tap_guard = asyncio.ensure_future(_hold(guard))
        try:
            run.dst_proc = await asyncio.create_subprocess_exec(
                *plan.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=target.clean_env(run.src.environ if run.libvirt else None),
                start_new_session=True, umask=0o077,
                pass_fds=list(taken.values()), preexec_fn=joiner.preexec())
        except (OSError, subprocess.SubprocessError) as e:
            raise DestinationFailed(f"cannot start {plan.argv[0]}: {e}") from e
        finally:
            os.close(log)
    finally:
        fdpass.close_all(taken.values())
        if joiner is not None:
            joiner.close()
    if transfer.mode is Mode.CPR_TRANSFER:
        assert plan.cpr_path
        await _wait_for_path(run, plan.cpr_path)  # its monitor waits for the cpr channel
        await _release_taps(run)  # it opens its netdevs only after the source has stopped
        return
    await _connect_destination(run)
    await _release_taps(run)  # its netdevs are set up: only loading the NIC touches them now
    await monitor.execute(run.dst_qmp, "migrate-incoming",  # type: ignore[arg-type]
                          {"uri": f"unix:{plan.migrate_path}"}, what="destination")


async def _wait_for_path(run: _Run, path: Path) -> None:
    assert run.dst_proc
    deadline = time.monotonic() + DESTINATION_START_TIMEOUT
    while not path.exists():
        if run.dst_proc.returncode is not None:
            raise DestinationFailed(f"the destination QEMU exited with {run.dst_proc.returncode}: "
                                    f"{_destination_log(run)}",
                                    "the VM still runs on the source; fix the cause and retry")
        if time.monotonic() > deadline:
            raise DestinationFailed(f"the destination did not open {path} within "
                                    f"{DESTINATION_START_TIMEOUT:.0f} s: {_destination_log(run)}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.dst_proc.wait()), 0.002)


async def _connect_destination(run: _Run) -> None:
    assert run.plan and run.transfer
    await _wait_for_path(run, run.plan.qmp_path)
    try:
        run.dst_qmp = await monitor.connect_new(run.plan.qmp_path, "destination")
    except MonitorError as e:
        # Usually the destination died right after opening its monitor: say why.
        assert run.dst_proc
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.dst_proc.wait()), 2)
        raise DestinationFailed(f"the destination QEMU's monitor failed ({e}): "
                                f"{_destination_log(run)}",
                                "the VM still runs on the source; fix the cause and retry") from e
    run.dst_events = EventListener(("MIGRATION",))
    run.dst_qmp.register_listener(run.dst_events)
    await _set_migration(run.dst_qmp, run.transfer.target_caps, run.transfer.target_params,
                         "destination")


async def _set_migration(client: monitor.Monitor, caps: dict[str, bool], params: dict[str, Any],
                         side: str) -> None:
    if caps:
        await monitor.execute(client, "migrate-set-capabilities", {"capabilities": [
            {"capability": k, "state": v} for k, v in caps.items()]}, what=side)
    if params:
        await monitor.execute(client, "migrate-set-parameters", params, what=side)


def _qmp(client: monitor.Monitor | QMPClient | None) -> Any:
    """A client whose replies are typed Any: QMP replies are JSON of the command's shape."""
    assert client is not None
    return client


async def _hold(guard: fdpass.VnetHeaderGuard) -> None:
    try:
        await guard.hold()
    finally:
        guard.close()


async def _release_taps(run: _Run) -> None:
    """Stop guarding the taps' header size (after a last check).

    Once the destination's monitor answers, its netdevs are initialised; it
    changes the size again only when it loads the NIC's state, to the value
    the source uses. Polling longer would only take CPU from the two QEMUs.
    """
    if run.tap_guard is not None:
        run.tap_guard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run.tap_guard
        run.tap_guard = None


def _destination_stderr(run: _Run) -> int:
    """Where the destination's stdout/stderr go, and where _destination_log reads them.

    A libvirt VM's QEMU writes to virtlogd through a pipe: the destination
    gets the same pipe (the domain's log goes on), read back from the log
    file virtlogd writes. With -D, the -D file (appended). Else a run-folder log.
    """
    assert run.plan and run.rundir and run.src
    if run.libvirt is not None:
        with contextlib.suppress(fdpass.FdAccessError, OSError):
            (fd,) = fdpass.take_fds(run.src.pid, [2]).values()
            run.stderr_path = run.libvirt.log_path
            run.stderr_offset = run.stderr_path.stat().st_size
            return fd
    run.stderr_path = run.plan.log_path or run.rundir / "destination.log"
    fd = os.open(run.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    run.stderr_offset = os.fstat(fd).st_size
    return fd


def _settle(path: Path, quiet: float = 0.1, limit: float = 1.0) -> None:
    """Wait (briefly) until a log another process writes stops growing.

    virtlogd copies the QEMU's stderr into the domain log asynchronously: the
    reason a destination failed may land a moment after the failure is seen.
    Only called on the way to reporting an error.
    """
    deadline = time.monotonic() + limit
    last, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            if size != last:
                last, still_since = size, time.monotonic()
            elif time.monotonic() - still_since >= quiet:
                return
        time.sleep(0.02)


def _own_by(ctx: context.SourceContext, dirs: list[Path]) -> None:
    """Private folders the destination creates sockets in belong to the user it runs as."""
    if ctx.uid != os.geteuid() or ctx.gid != os.getegid():
        for d in dirs:
            os.chown(d, ctx.uid, ctx.gid)


def _destination_log(run: _Run) -> str:
    """What the destination wrote to stderr since it started (its reason for failing)."""
    if run.stderr_path is None:
        return ""
    if run.libvirt is not None:
        _settle(run.stderr_path)
    with contextlib.suppress(OSError):
        with run.stderr_path.open("rb") as f:
            f.seek(run.stderr_offset)
            text = f.read().decode(errors="replace").strip()
        return text[-800:] or "(no output)"
    return "(no output)"


async def _transfer(run: _Run) -> None:
    plan, transfer, src_qmp = run.plan, run.transfer, run.src_qmp
    assert plan and transfer and src_qmp and run.dst_proc
    await _set_migration(src_qmp, transfer.source_caps, transfer.source_params, "source")
    main = {"transport": "socket", "type": "unix", "path": str(plan.migrate_path)}
    if transfer.mode is Mode.CPR_TRANSFER:
        assert plan.cpr_path
        cpr = {"transport": "socket", "type": "unix", "path": str(plan.cpr_path)}
        await monitor.execute(src_qmp, "migrate", {"channels": [
            {"channel-type": "main", "addr": main}, {"channel-type": "cpr", "addr": cpr}]},
            what="source")
        await _connect_destination(run)
        await monitor.execute(run.dst_qmp, "migrate-incoming",  # type: ignore[arg-type]
                              {"channels": [{"channel-type": "main", "addr": main}]},
                              what="destination")
    else:
        await monitor.execute(src_qmp, "migrate", {"uri": f"unix:{plan.migrate_path}"},
                              what="source")
    await _await_completion(run)


async def _await_completion(run: _Run) -> None:
    """Follow the migration until the destination has loaded the whole VM state.

    The destination's MIGRATION event says "completed" the moment it can run
    the guest; reacting to it (not to a poll) keeps the guest's pause short.
    The source is polled for progress and for QEMU's reason when it fails.
    """
    assert run.src_qmp and run.dst_proc and run.dst_events
    next_poll = 0.0
    while True:
        with contextlib.suppress(TimeoutError):
            event = await asyncio.wait_for(run.dst_events.get(), PROGRESS_INTERVAL)
            data: Any = dict(event).get("data") or {}
            status = data.get("status")
            if status == "completed":
                return
            if status == "failed":
                raise DestinationFailed("the destination failed to load the VM state: "
                                        f"{_destination_log(run)}")
        if run.dst_proc.returncode is not None:
            raise DestinationFailed(f"the destination QEMU exited during the transfer with "
                                    f"{run.dst_proc.returncode}: {_destination_log(run)}")
        if time.monotonic() < next_poll:
            continue
        next_poll = time.monotonic() + PROGRESS_INTERVAL
        info = await monitor.execute(run.src_qmp, "query-migrate", what="source")
        src_status = info.get("status")
        ram = info.get("ram") or {}
        run.emit("progress", f"migration {src_status}", ram_transferred=ram.get("transferred"),
                 ram_total=ram.get("total"))
        if src_status in ("failed", "cancelled"):
            detail = info.get("error-desc") or _destination_log(run)
            raise TransferFailed(f"the migration {src_status}: {detail}",
                                 "the VM still runs on the source; see the cause above")


async def _rollback(run: _Run) -> None:
    """Undo everything before switchover: the source runs as before, the destination is gone."""
    run.emit("rollback", "rolling back: the VM stays on the source")
    if run.src_qmp is not None and run.state is not None:
        with contextlib.suppress(Exception):
            info = await _qmp(run.src_qmp).execute("query-migrate")
            if info.get("status") in ACTIVE_STATES:
                await _qmp(run.src_qmp).execute("migrate_cancel")
                for _ in range(200):
                    info = await _qmp(run.src_qmp).execute("query-migrate")
                    if info.get("status") not in ACTIVE_STATES:
                        break
                    await asyncio.sleep(0.01)
    await _kill_destination(run)
    await _release_taps(run)
    await _restore_source_settings(run)
    _remove_private_paths(run)
    await _give_back_to_libvirt(run)


async def _restore_source_settings(run: _Run) -> None:
    """The source runs as before the upgrade: resumed, capabilities and parameters back."""
    if run.src_qmp is not None and run.state is not None:
        with contextlib.suppress(Exception):
            status = await _qmp(run.src_qmp).execute("query-status")
            if run.state.running and not status["running"]:
                await _qmp(run.src_qmp).execute("cont")
        with contextlib.suppress(Exception):
            await _qmp(run.src_qmp).execute("migrate-set-capabilities", {"capabilities": [
                {"capability": k, "state": False}
                for k in (run.transfer.source_caps if run.transfer else {}) if k != "events"]})
        # Give the source back the migration parameters it had (mode, bandwidth, ...),
        # so whatever migrates it next does not inherit ours.
        if run.transfer is not None:
            before = run.state.parameters
            restore = {k: before[k] for k in run.transfer.source_params if k in before}
            with contextlib.suppress(Exception):
                await _qmp(run.src_qmp).execute("migrate-set-parameters", restore)


async def _kill_destination(run: _Run) -> None:
    if run.dst_qmp is not None:
        with contextlib.suppress(Exception):
            await run.dst_qmp.disconnect()
        run.dst_qmp = None
    proc = run.dst_proc
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()


def _remove_private_paths(run: _Run) -> None:
    if run.plan is not None:
        for rel in run.plan.relocations:
            shutil.rmtree(rel.private.parent, ignore_errors=True)
    if run.rundir is not None:
        shutil.rmtree(run.rundir, ignore_errors=True)


async def _finish(run: _Run) -> UpgradeResult:
    """Switchover, then retire the source and move the destination's paths into place."""
    assert run.src and run.state and run.src_qmp and run.dst_proc and run.plan and run.transfer
    assert run.info and run.dst_qmp
    async with run.phase("switchover", "resuming the guest on the destination"):
        if run.state.running:
            try:
                await monitor.execute(run.dst_qmp, "cont", what="destination")
            except (MonitorError, ConnectionError) as e:
                # The destination never ran the guest: the source can still take it back.
                await _rollback(run)
                raise TransferFailed(f"the destination would not resume the guest: {e}; "
                                     "the VM runs on the source") from e
        # ---- point of no return: the guest lives in the destination from here ----
        status = await _qmp(run.dst_qmp).execute("query-status")
    run.migration = await _qmp(run.src_qmp).execute("query-migrate")
    vnc_fds = _take_vnc(run)
    async with run.phase("retire", "stopping the old QEMU"):
        await _retire_source(run)
    async with run.phase("relocate", "moving sockets, display and pidfile into place"):
        notes = await _hand_over_vnc(run, vnc_fds)
        moved = _relocate(run)
    if run.libvirt is not None:
        async with run.phase("adopt", "handing the new QEMU back to libvirt"):
            notes += await _adopt(run)
    m = run.migration
    return UpgradeResult(
        name=run.state.name, uuid=run.state.uuid, machine=run.state.machine,
        mode=run.transfer.mode.value, mode_reason=run.transfer.reason,
        source_pid=run.src.pid, destination_pid=run.dst_proc.pid,
        source_version=str(run.state.version), target_version=str(run.info.version),
        target_binary=str(run.info.path), guest_running=bool(status["running"]),
        downtime_ms=m.get("downtime"), total_time_ms=m.get("total-time"),
        setup_time_ms=m.get("setup-time"),
        ram_transferred_bytes=(m.get("ram") or {}).get("transferred"),
        bytes_transferred=(m.get("ram") or {}).get("total"),
        phases_ms=dict(run.phases_ms), destination_argv=run.plan.argv, moved_paths=moved,
        handed_over=run.plan.handed_over + notes)


async def _retire_source(run: _Run) -> None:
    """Kill the old QEMU: after switchover it owns nothing the guest needs.

    It is killed, not asked to `quit`, because a clean exit undoes what the
    new QEMU now shares with it: QEMU unlinks the paths of its listening
    sockets (the same sockets the destination now serves), runs tap
    downscripts (unplugging the tap from its bridge), and honours
    discard-data on shared RAM. Its disks were flushed and released when the
    migration completed.
    """
    assert run.src and run.src_qmp
    with contextlib.suppress(Exception):
        await run.src_qmp.disconnect()
    run.src_qmp = None
    with contextlib.suppress(psutil.Error):
        psutil.Process(run.src.pid).kill()
    run.source_killed_at = time.monotonic()
    await _wait_gone(run.src.pid, SOURCE_EXIT_TIMEOUT)


def _take_vnc(run: _Run) -> dict[int, int]:
    """Duplicate the source's VNC listening sockets before it is killed."""
    assert run.plan and run.src
    vnc = run.plan.vnc
    if vnc is None or not vnc.source_fds:
        return {}
    try:
        return fdpass.take_fds(run.src.pid, list(vnc.source_fds))
    except fdpass.FdAccessError:
        return {}  # fall back to rebinding the address once the source is gone


async def _hand_over_vnc(run: _Run, taken: dict[int, int]) -> list[str]:
    """Point the destination's VNC at the source's listening sockets (or its address).

    Past the point of no return: a failure is reported, never raised, since
    the guest runs on the destination whatever happens to the display.
    """
    vnc = run.plan.vnc if run.plan else None
    if vnc is None:
        return []
    client = _qmp(run.dst_qmp)
    addresses: list[dict[str, Any]] = []
    try:
        for index, fd in enumerate(taken.values()):
            name = f"liveupgrade-vnc{index}"
            client.send_fd_scm(fd)
            await client.execute("getfd", {"fdname": name})
            addresses.append({"type": "fd", "str": name})
        how = "took over the source's listening socket(s)" if addresses else "rebound"
        await client.execute("display-update", {"type": "vnc",
                                                "addresses": addresses or [vnc.address]})
        return [f"VNC {vnc.display}: {how}"]
    except Exception as e:
        return [f"VNC {vnc.display}: NOT handed over ({e}); the display stays on the "
                "destination's private socket"]
    finally:
        fdpass.close_all(taken.values())


async def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process to exit without reaping it (its parent may be waiting on it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        await asyncio.sleep(0.005)
    return False


def _relocate(run: _Run) -> list[str]:
    """Put the sockets that could not be handed over, and the pidfile, where the source had them.

    A socket moved here had no listener at its path from the moment the old
    QEMU died until the rename: that gap is reported with the path.
    """
    assert run.plan
    moved, failed = [], []
    for rel in run.plan.relocations:
        try:
            os.replace(rel.private, rel.original)
            note = ""
            if rel.kind != "pidfile" and run.source_killed_at is not None:
                gap_ms = (time.monotonic() - run.source_killed_at) * 1e3
                note = f" (rebound: no listener for {gap_ms:.1f} ms)"
            moved.append(f"{rel.original}{note}")
        except OSError as e:
            failed.append(f"{rel.private} -> {rel.original}: {e.strerror}")
        with contextlib.suppress(OSError):
            rel.private.parent.rmdir()
    if run.rundir is not None:
        shutil.rmtree(run.rundir, ignore_errors=True)
    if failed:
        raise SwitchoverFailed(
            "the guest runs on the new QEMU, but these paths could not be moved into place: "
            + "; ".join(failed), "move them by hand; the new QEMU listens on the private paths")
    return moved


__all__ = ["LiveUpgradeError", "UpgradeEvent", "UpgradeResult", "upgrade"]
