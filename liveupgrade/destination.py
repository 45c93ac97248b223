"""The destination QEMU: one object owns the process, its private monitor, its
MIGRATION events, its log and its tap guard, with one idempotent kill.

Modelled on QEMU's python/qemu/machine/machine.py: whoever holds a
Destination can always call `kill()`, at any point of its life, any number
of times, and afterwards nothing of it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import QMPClient
from qemu.qmp.events import EventListener

from liveupgrade import context, fdpass, monitor, procs
from liveupgrade.errors import DestinationFailed, MonitorError
from liveupgrade.plan import DestinationPlan

START_TIMEOUT = 30.0
EXIT_GRACE = 2.0  # how long a failing destination gets to exit and say why


@dataclass
class DestinationLog:
    """Where the destination's stdout/stderr go, and reading back what it said.

    A libvirt VM's QEMU writes to virtlogd through a pipe: the destination
    gets the same pipe (the domain's log goes on), read back from the log
    file virtlogd writes (asynchronously: `settle` first). With -D, the -D
    file (appended). Else a log in the run folder.
    """

    path: Path
    offset: int
    settle: bool = False

    @classmethod
    def open(cls, plan: DestinationPlan, rundir: Path, source_pid: int,
             libvirt_log: Path | None) -> tuple[DestinationLog, int]:
        """The log and the descriptor to give the destination as stdout/stderr."""
        if libvirt_log is not None:
            with contextlib.suppress(fdpass.FdAccessError, OSError):
                (fd,) = fdpass.take_fds(source_pid, [2]).values()
                return cls(libvirt_log, libvirt_log.stat().st_size, settle=True), fd
        path = plan.log_path or rundir / "destination.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return cls(path, os.fstat(fd).st_size), fd

    def tail(self) -> str:
        """What the destination wrote since it started (its reason for failing)."""
        if self.settle:
            _settle(self.path)
        with contextlib.suppress(OSError):
            with self.path.open("rb") as f:
                f.seek(self.offset)
                text = f.read().decode(errors="replace").strip()
            return text[-800:] or "(no output)"
        return "(no output)"


def _settle(path: Path, quiet: float = 0.1, limit: float = 1.0) -> None:
    """Wait (briefly) until a log another process writes stops growing."""
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


class Destination:
    """A new QEMU started paused (-S -incoming defer) to receive the VM."""

    def __init__(self, plan: DestinationPlan, rundir: Path):
        self.plan = plan
        self.rundir = rundir
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None
        self.events: EventListener | None = None
        self.resumes = EventListener(("RESUME",))  # when the guest's vCPUs ran again
        self.log: DestinationLog | None = None
        self._tap_guard: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DestinationFailed("the destination QEMU was never started")
        return self.proc.pid

    @property
    def exited(self) -> int | None:
        """Its exit status, or None while it runs."""
        return None if self.proc is None else self.proc.returncode

    async def start(self, taken: Mapping[int, int], ctx: context.SourceContext,
                    env: dict[str, str], log: DestinationLog, log_fd: int,
                    also: Sequence[int] = (), guard: Sequence[int] = ()) -> None:
        """Start it on `taken` (the source's descriptors, duplicated into this process)
        and `also` (descriptors opened for it, e.g. a fresh /dev/vhost-net).

        From here until its monitor answers, the taps' vnet header size is
        guarded (fdpass.VnetHeaderGuard): a starting QEMU resets it under the
        running source. The size belongs to the device, so `guard` (a fresh
        queue of each multiqueue tap) guards those taps too.
        """
        self.log = log
        if self.plan.tap_fds or guard:
            sizes = fdpass.VnetHeaderGuard([*(taken[fd] for fd in self.plan.tap_fds), *guard])
            self._tap_guard = asyncio.ensure_future(_hold(sizes))
        joiner = context.Joiner(ctx)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.plan.argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                env=env, start_new_session=True, umask=0o077,
                pass_fds=[*taken.values(), *also], preexec_fn=joiner.preexec())
        except (OSError, subprocess.SubprocessError) as e:
            raise DestinationFailed(f"cannot start {self.plan.argv[0]}: {e}") from e
        finally:
            joiner.close()

    def why(self) -> str:
        return self.log.tail() if self.log else "(no output)"

    async def wait_for_path(self, path: Path) -> None:
        """Wait until the destination has created `path` (a socket it listens on)."""
        deadline = time.monotonic() + START_TIMEOUT
        while not path.exists():
            if self.exited is not None:
                raise DestinationFailed(f"the destination QEMU exited with {self.exited}: "
                                        f"{self.why()}",
                                        "the VM still runs on the source; fix the cause and retry")
            if time.monotonic() > deadline:
                raise DestinationFailed(f"the destination did not open {path} within "
                                        f"{START_TIMEOUT:.0f} s: {self.why()}")
            await self._wait_exit(0.002)

    async def connect(self, caps: dict[str, bool], params: dict[str, Any]) -> QMPClient:
        """Open the private monitor, listen for MIGRATION events, set the mode's settings."""
        await self.wait_for_path(self.plan.qmp_path)
        try:
            self.qmp = await monitor.connect_new(self.plan.qmp_path, "destination")
        except MonitorError as e:
            await self._wait_exit(EXIT_GRACE)  # usually it died right after opening it: say why
            raise DestinationFailed(f"the destination QEMU's monitor failed ({e}): {self.why()}",
                                    "the VM still runs on the source; fix the cause and retry"
                                    ) from e
        self.events = EventListener(("MIGRATION",))
        self.qmp.register_listener(self.events)
        self.qmp.register_listener(self.resumes)
        await set_migration(self.qmp, caps, params, "destination")
        return self.qmp

    async def release_taps(self) -> None:
        """Stop guarding the taps' header size (after a last check).

        Once the destination's monitor answers, its netdevs are initialised; it
        changes the size again only when it loads the NIC's state, to the value
        the source uses. Polling longer would only take CPU from the two QEMUs.
        """
        guard, self._tap_guard = self._tap_guard, None
        if guard is not None:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard

    def resumed_at(self) -> float | None:
        """The host time (s) of the destination's first RESUME event, if any."""
        times = [event_time(e) for e in self.resumes.clear()]
        return times[0] if times else None

    async def failure(self, grace: float = EXIT_GRACE) -> str | None:
        """The destination's own reason when the migration failed: its log, if it has
        exited (or exits within `grace`), else None (the source's reason stands)."""
        if self.proc is None:
            return None
        await self._wait_exit(grace)
        if self.exited is None:
            return None
        return f"the destination QEMU exited with {self.exited}: {self.why()}"

    async def _wait_exit(self, seconds: float) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), seconds)

    async def kill(self) -> None:
        """Make sure nothing of the destination runs; safe to call at any time, repeatedly."""
        await self.release_taps()
        client, self.qmp = self.qmp, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        await asyncio.to_thread(kill_strays, self.rundir)

    async def disconnect(self) -> None:
        """Let go of the private monitor (the process runs on: it is the VM now)."""
        client, self.qmp = self.qmp, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()


def event_time(event: Mapping[str, Any]) -> float:
    """A QMP event's timestamp (QEMU stamps it with the host's real-time clock), in s."""
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


async def set_migration(client: monitor.Monitor, caps: dict[str, bool], params: dict[str, Any],
                        side: str) -> None:
    """Set migration capabilities and parameters on one side."""
    if caps:
        await monitor.execute(client, "migrate-set-capabilities", {"capabilities": [
            {"capability": k, "state": v} for k, v in caps.items()]}, what=side)
    if params:
        await monitor.execute(client, "migrate-set-parameters", params, what=side)


async def _hold(guard: fdpass.VnetHeaderGuard) -> None:
    try:
        await guard.hold()
    finally:
        guard.close()


def kill_strays(rundir: Path | str, pid: int | None = None,
                created: float | None = None) -> list[int]:
    """SIGKILL every process that is this destination: `pid` if it still is the process
    it was, and any process naming the run folder on its command line (its private
    monitor lives there, so only a destination of this upgrade does). Returns the PIDs."""
    marker = str(rundir)
    victims = [pid] if pid is not None and procs.kill(pid, created) else []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info.get("cmdline") or []
        if proc.pid != os.getpid() and any(marker in arg for arg in argv):
            with contextlib.suppress(psutil.Error):
                proc.kill()
                victims.append(proc.pid)
    procs.wait_gone(victims, 10.0)
    return victims
