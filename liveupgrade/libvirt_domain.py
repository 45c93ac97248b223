"""libvirt-managed VMs: find them, drive them through libvirt, hand the new QEMU back.

libvirt owns such a VM's monitor (it passes QEMU a listening socket and
stays connected), so the engine talks to the source through libvirt's
qemuMonitorCommand while libvirt runs. libvirt cannot be told that its VM
now lives in another process: virDomainQemuAttach was removed for QEMU in
libvirt 5.5.0, and a same-host migration is refused. If the old QEMU simply
died, libvirt would clean up after it (restore file ownership, delete the RAM
folder and the tap, mark the domain shut off) and allow a second `virsh
start` on the same disks.

So the opt-in adopt path (`--libvirt-adopt`) uses libvirt's own reconnect
logic, which is what runs when the daemon restarts under live VMs:

1. before the transfer, stop the daemon (libvirtd or virqemud): the VM runs
   on, nobody can `virsh start` a second copy (no daemon), and the source's
   monitor is free for the engine;
2. after switchover, kill the old QEMU (no daemon sees it die), point the
   domain's runtime status (`/run/libvirt/qemu/NAME.xml`: pid, emulator)
   and pidfile at the new QEMU;
3. start the daemon again: it reconnects to the monitor socket (the same
   listening socket, handed over) and finds the domain running. The engine
   checks that libvirt reports it running on the new process.

A failure before switchover restarts the daemon with the status untouched.
This relies on libvirt internals (the status file format) and is refused on
libvirt versions it was not tested with (TESTED_VERSIONS).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from liveupgrade.errors import LiveUpgradeError, MonitorError, Refused
from liveupgrade.preflight import Preflight

SYSTEM_URI = "qemu:///system"
SYSTEM_STATUS_DIR = Path("/run/libvirt/qemu")
DAEMON_NAMES = ("virtqemud", "libvirtd")
# (major, minor) of libvirt releases the adopt path was tested with.
TESTED_VERSIONS = frozenset({(9, 0)})
DAEMON_STOP_TIMEOUT = 30.0
DAEMON_START_TIMEOUT = 30.0

_DOMSTATUS_PID = re.compile(r"(<domstatus\b[^>]*\bpid=')(\d+)(')")
_EMULATOR = re.compile(r"(<emulator>)([^<]*)(</emulator>)")


class LibvirtError(LiveUpgradeError):
    """libvirt refused or failed; the message quotes libvirt."""


@dataclass
class LibvirtVM:
    """A QEMU process that libvirt manages, as libvirt's runtime status describes it."""

    pid: int
    name: str
    uri: str
    status_path: Path
    pidfile: Path
    log_path: Path  # where virtlogd writes the QEMU's stderr

    def describe(self) -> str:
        return f"libvirt domain {self.name} on {self.uri}"


def status_pid(status: Path) -> int | None:
    """The QEMU PID a runtime status file names (`<domstatus pid=...>`), or None."""
    with contextlib.suppress(OSError):
        match = _DOMSTATUS_PID.search(status.read_text())
        if match:
            return int(match.group(2))
    return None


def find(pid: int, status_dir: Path = SYSTEM_STATUS_DIR) -> LibvirtVM | None:
    """The libvirt domain whose runtime status names this PID, or None."""
    with contextlib.suppress(OSError):
        for status in sorted(status_dir.glob("*.xml")):
            if status_pid(status) == pid:
                name = status.stem
                return LibvirtVM(pid, name, SYSTEM_URI, status, status_dir / f"{name}.pid",
                                 Path("/var/log/libvirt/qemu") / f"{name}.log")
    return None


def import_libvirt() -> Any:
    try:
        import libvirt
    except ImportError as e:
        raise Refused("this VM is managed by libvirt, and the libvirt Python binding is "
                      "missing", "pip install 'liveupgrade[libvirt]' (libvirt-python)") from e
    return libvirt


class LibvirtMonitor:
    """The source's QMP monitor, reached through libvirt (it owns the socket).

    Duck-types the part of qemu.qmp.QMPClient the engine uses (monitor.Monitor).
    """

    def __init__(self, vm: LibvirtVM):
        libvirt = import_libvirt()
        import libvirt_qemu

        self.vm = vm
        self._qemu = libvirt_qemu
        self._libvirt = libvirt
        try:
            self.conn = libvirt.open(vm.uri)
            self.dom = self.conn.lookupByName(vm.name)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot reach {vm.describe()}: {e}",
                               "start the libvirt daemon (libvirtd -d, or virtqemud -d)") from e

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                      oob: bool = False) -> object:
        request: dict[str, Any] = {"execute": cmd}
        if arguments:
            request["arguments"] = dict(arguments)
        try:
            reply = await asyncio.to_thread(self._qemu.qemuMonitorCommand, self.dom,
                                            json.dumps(request), 0)
        except self._libvirt.libvirtError as e:
            raise MonitorError(f"libvirt's monitor pass-through failed for {cmd}: {e}") from e
        data = json.loads(reply)
        if "error" in data:
            err = data["error"]
            raise MonitorError(f"QEMU refused {cmd} (through libvirt): "
                               f"{err.get('class')}: {err.get('desc')}")
        return data.get("return")

    async def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def library_version(self) -> tuple[int, int, int]:
        v = self.conn.getLibVersion()
        return v // 1_000_000, v // 1000 % 1000, v % 1000

    def attach_supported(self) -> str | None:
        """None if virDomainQemuAttach is available, else libvirt's refusal.

        Probed with our own PID (not a QEMU): a libvirt without the API
        refuses with "not supported" before it looks at the process.
        """
        try:
            self._qemu.qemuAttach(self.conn, os.getpid(), 0)
        except self._libvirt.libvirtError as e:
            if e.get_error_code() == self._libvirt.VIR_ERR_NO_SUPPORT:
                return str(e)
            return None
        return None


@dataclass
class Daemon:
    """The libvirt daemon process that manages QEMU domains, and how to start it again."""

    pid: int
    name: str
    argv: list[str]
    cwd: str
    environ: dict[str, str] = field(default_factory=dict)

    @classmethod
    def find(cls) -> Daemon | None:
        for proc in psutil.process_iter(["name", "cmdline"]):
            name = proc.info.get("name") or ""
            if name in DAEMON_NAMES:
                with contextlib.suppress(psutil.Error):
                    return cls(proc.pid, name, proc.cmdline(), proc.cwd(), proc.environ())
        return None

    def restart_problem(self) -> str | None:
        """Why this daemon cannot be stopped and started again by us, or None."""
        if Path("/run/systemd/system").exists():
            return None  # systemctl restarts it
        if not any(a in ("-d", "--daemon") for a in self.argv[1:]):
            return (f"{self.name} (PID {self.pid}) runs in the foreground under a supervisor "
                    "that liveupgrade does not know how to pause")
        return None

    async def stop(self) -> None:
        if Path("/run/systemd/system").exists():
            await _run(["systemctl", "stop", self.name])
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(self.pid)
            proc.send_signal(signal.SIGTERM)
            gone, _ = await asyncio.to_thread(psutil.wait_procs, [proc], DAEMON_STOP_TIMEOUT)
            if not gone:
                raise LibvirtError(f"{self.name} (PID {self.pid}) did not stop within "
                                   f"{DAEMON_STOP_TIMEOUT:.0f} s")

    async def start(self) -> None:
        if Path("/run/systemd/system").exists():
            await _run(["systemctl", "start", self.name])
            return
        await _run(self.argv, cwd=self.cwd, env=self.environ)


@dataclass
class LibvirtPause:
    """The libvirt daemon stopped for one upgrade, and the two ways it comes back.

    Prepared (the daemon found, its argv/cwd/environment noted: the journal
    records them) before `stop`; `give_back` (rollback: the untouched status
    still names the source) or `adopt` (after switchover) start it again.
    Both are idempotent: a daemon already running is not started twice.
    """

    vm: LibvirtVM
    daemon: Daemon

    @classmethod
    def prepare(cls, vm: LibvirtVM) -> LibvirtPause:
        daemon = Daemon.find()
        if daemon is None:
            raise LibvirtError("the libvirt daemon disappeared during the upgrade",
                               "start it again (libvirtd -d) and retry")
        return cls(vm, daemon)

    def to_json(self) -> dict[str, Any]:
        return {"vm": {k: str(v) if isinstance(v, Path) else v
                       for k, v in dataclasses.asdict(self.vm).items()},
                "daemon": dataclasses.asdict(self.daemon)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LibvirtPause:
        vm = dict(data["vm"])
        for key in ("status_path", "pidfile", "log_path"):
            vm[key] = Path(vm[key])
        return cls(LibvirtVM(**vm), Daemon(**data["daemon"]))

    async def stop(self) -> None:
        """With the daemon down nobody can start a second copy of the VM, and no daemon
        sees the old QEMU exit after switchover (it would clean up under the guest)."""
        await self.daemon.stop()

    async def _start(self) -> None:
        if Daemon.find() is None:
            await self.daemon.start()

    async def give_back(self, pid: int, running: bool) -> None:
        """Rollback: start the daemon again on the untouched status; it finds the source."""
        await self._start()
        await (await wait_running_on(self.vm, pid, running)).disconnect()

    async def adopt(self, pid: int, emulator: str, running: bool) -> list[str]:
        """After switchover: point libvirt's status at the new QEMU and start the daemon."""
        point_status_at(self.vm, pid, emulator)
        await self._start()
        mon = await wait_running_on(self.vm, pid, running)
        try:
            version = await mon.execute("query-version")
        finally:
            await mon.disconnect()
        q: Any = version
        q = q["qemu"]
        return [f"libvirt: {self.vm.describe()} adopted by {self.daemon.name}: running on PID "
                f"{pid}, QEMU {q['major']}.{q['minor']}.{q['micro']} answers through libvirt"]


async def _run(argv: list[str], **kwargs: Any) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, **kwargs)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise LibvirtError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{out.decode(errors='replace').strip()}")


def point_status_at(vm: LibvirtVM, new_pid: int, emulator: str) -> None:
    """Rewrite the domain's runtime status and pidfile for the new QEMU.

    Only the pid and the live definition's emulator change; everything else
    (monitor path, namespaces, aliases, capabilities) still holds, since the
    new process has the same monitor socket, devices and namespaces.
    """
    text = vm.status_path.read_text()
    text, pids = _DOMSTATUS_PID.subn(rf"\g<1>{new_pid}\g<3>", text, count=1)
    text, _ = _EMULATOR.subn(rf"\g<1>{emulator}\g<3>", text, count=1)
    if pids != 1:
        raise LibvirtError(f"{vm.status_path} has no <domstatus pid=...>: unknown format")
    tmp = vm.status_path.with_name(f".{vm.status_path.name}.liveupgrade")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, vm.status_path)
    with contextlib.suppress(OSError):
        vm.pidfile.write_text(f"{new_pid}\n")


async def wait_running_on(vm: LibvirtVM, pid: int, running: bool = True,
                          timeout: float = DAEMON_START_TIMEOUT) -> LibvirtMonitor:
    """Reconnect to the restarted daemon; the domain must be on `pid`, running (or paused)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            mon = await asyncio.to_thread(LibvirtMonitor, vm)
            state, _ = mon.dom.state()
            wanted = mon._libvirt.VIR_DOMAIN_RUNNING if running else mon._libvirt.VIR_DOMAIN_PAUSED
            if state == wanted and find(pid) is not None:
                return mon
            await mon.disconnect()
            last = LibvirtError(f"libvirt reports {vm.name} in state {state}")
        except LiveUpgradeError as e:
            last = e
        await asyncio.sleep(0.1)
    raise LibvirtError(f"libvirt did not report {vm.name} running on PID {pid} within "
                       f"{timeout:.0f} s: {last}")


def check(pf: Preflight, client: LibvirtMonitor, adopt: bool) -> None:
    """Whether this libvirt VM can be upgraded, and how the new QEMU gets back to libvirt."""
    vm = client.vm
    version = client.library_version()
    attach = client.attach_supported()
    daemon = Daemon.find()
    problems = []
    if attach is None:
        problems.append(f"libvirt {'.'.join(map(str, version))} offers virDomainQemuAttach, "
                        "but liveupgrade has not been tested with it")
    elif not adopt:
        problems.append(f"{vm.describe()}: libvirt cannot take a new QEMU back ({attach}), and "
                        "an upgrade behind its back would let it clean up under the running "
                        "guest and allow a second 'virsh start'")
    if adopt and version[:2] not in TESTED_VERSIONS:
        tested = ", ".join(f"{major}.{minor}" for major, minor in sorted(TESTED_VERSIONS))
        problems.append(f"--libvirt-adopt relies on libvirt internals and was tested only with "
                        f"libvirt {tested}, not {'.'.join(map(str, version))}")
    if daemon is None:
        problems.append("no libvirtd or virtqemud process found")
    elif adopt and daemon.restart_problem():
        problems.append(daemon.restart_problem() or "")
    if adopt and not os.access(vm.status_path, os.W_OK):
        problems.append(f"cannot write libvirt's runtime status {vm.status_path} (run as root)")
    how = (f"adopt: {daemon.name if daemon else 'the daemon'} is stopped before the transfer and "
           f"restarted on the new QEMU (runtime status {vm.status_path})")
    pf.add("libvirt", "; ".join(problems) or None, f"{vm.describe()}; {how}",
           "opt in with --libvirt-adopt (restarts the libvirt daemon; relies on libvirt's "
           "runtime status format: see docs/libvirt.md)" if not adopt else
           "upgrade this VM the libvirt way (virsh managedsave + start)")
