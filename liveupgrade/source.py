"""Find the VM to upgrade and learn what it is: process facts and QMP state."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import QMPClient

from liveupgrade import journal, monitor
from liveupgrade.cmdline import CommandLine, CommandLineError
from liveupgrade.endpoints import qmp_paths
from liveupgrade.errors import MonitorError, NotQemu, Refused, SourceNotFound
from liveupgrade.handover import fd_qmp_paths
from liveupgrade.versions import QemuVersion

QEMU_EXE = re.compile(r"^(qemu-system-[\w.-]+|qemu-kvm|kvm)$")


@dataclass
class SourceProcess:
    """What the kernel says about the source QEMU."""

    pid: int
    exe: str  # may end in " (deleted)" when the package was upgraded underneath
    argv: list[str]
    cmdline: CommandLine
    qmp_path: Path
    environ: dict[str, str]
    create_time: float


@dataclass
class SourceState:
    """What the source QEMU says about itself over QMP."""

    status: str
    running: bool
    name: str | None
    uuid: str
    machine: str  # the concrete, versioned type, e.g. pc-i440fx-7.2
    version: QemuVersion
    capabilities: set[str]
    parameters: dict[str, Any]
    migration_status: str
    arch: str
    tcg: bool
    ram_bytes: int


def is_qemu_exe(path: str) -> bool:
    return bool(QEMU_EXE.match(os.path.basename(path.removesuffix(" (deleted)"))))


def _process_facts(proc: psutil.Process) -> tuple[str, list[str]]:
    try:
        argv = proc.cmdline()
        exe = os.readlink(f"/proc/{proc.pid}/exe")
    except psutil.AccessDenied as e:
        raise SourceNotFound(f"permission denied reading process {proc.pid}",
                             "run liveupgrade as root or as the VM's owner") from e
    except (psutil.NoSuchProcess, FileNotFoundError) as e:
        raise SourceNotFound(f"process {proc.pid} exited", "give a running VM") from e
    except PermissionError as e:
        raise SourceNotFound(f"permission denied reading /proc/{proc.pid}/exe",
                             "run liveupgrade as root or as the VM's owner") from e
    return exe, argv


def inspect_process(pid: int) -> SourceProcess:
    """Read argv and executable of `pid` and find its QMP socket."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess as e:
        raise SourceNotFound(f"no process with PID {pid}", "check the PID (ps, pgrep qemu)") from e
    exe, argv = _process_facts(proc)
    if not is_qemu_exe(exe):
        raise NotQemu(f"process {pid} ({os.path.basename(exe)}) is not a QEMU system emulator",
                      "give the PID, QMP socket or -name of a qemu-system-* process")
    try:
        cmdline = CommandLine.parse(argv)
    except CommandLineError as e:
        raise NotQemu(f"cannot parse the command line of process {pid}: {e}") from e
    qmps = qmp_paths(cmdline) or fd_qmp_paths(pid, cmdline)
    if not qmps:
        raise Refused(f"VM {pid} has no QMP unix socket on its command line",
                      "start it with -qmp unix:PATH,server=on,wait=off (or a -chardev "
                      "socket server with -mon mode=control); libvirt VMs: see docs/libvirt.md")
    try:
        environ = proc.environ()
    except psutil.Error:
        environ = {}
    return SourceProcess(pid, exe, argv, cmdline, qmps[0], environ, proc.create_time())


def qemu_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["exe", "cmdline"]):
        exe = proc.info.get("exe") or ""
        argv = proc.info.get("cmdline") or []
        if is_qemu_exe(exe) or (argv and is_qemu_exe(argv[0])):
            found.append(proc)
    return found


def resolve(source: str | int) -> SourceProcess:
    """A PID, a QMP socket path, or a VM's -name, to the process behind it.

    The destination of an upgrade in progress has the source's -name and
    serves its QMP socket, but is never the VM: it is skipped, and naming
    its PID is refused.
    """
    transactions = journal.journals()
    if isinstance(source, int) or str(source).isdigit():
        facts = inspect_process(int(source))
        txn = journal.destination_of(facts.argv, facts.pid, transactions)
        if txn is not None:
            raise Refused(f"PID {facts.pid} is the new QEMU of an upgrade of VM {txn.label} "
                          "that is in progress or was interrupted, not a VM of its own",
                          f"give the VM's own PID ({txn.facts.get('source', {}).get('pid')}); "
                          "`liveupgrade list` shows both")
        return facts
    text = str(source)
    matches: list[SourceProcess] = []
    as_path = Path(text).resolve() if "/" in text else None
    for proc in qemu_processes():
        try:
            facts = inspect_process(proc.pid)
        except (SourceNotFound, NotQemu, Refused):
            continue
        if journal.destination_of(facts.argv, facts.pid, transactions) is not None:
            continue
        if as_path is not None:
            if any(as_path == p.resolve() for p in qmp_paths(facts.cmdline)
                   + fd_qmp_paths(proc.pid, facts.cmdline)):
                matches.append(facts)
        else:
            name_opt = facts.cmdline.first("name")
            if name_opt is not None and name_opt.prop("guest") == text:
                matches.append(facts)
    if not matches:
        what = f"QMP socket {text}" if as_path else f"-name {text}"
        raise SourceNotFound(f"no running QEMU with {what}",
                             "list VMs with: ps -C qemu-system-x86_64 -o pid,args")
    if len(matches) > 1:
        pids = ", ".join(str(m.pid) for m in matches)
        raise SourceNotFound(f"{text} matches several QEMU processes ({pids})",
                             "give the PID instead")
    return matches[0]


ACTIVE_MIGRATION = frozenset({"setup", "active", "pre-switchover", "device", "cancelling",
                              "postcopy-active", "wait-unplug", "postcopy-paused",
                              "postcopy-recover"})


async def query_state(client: monitor.Monitor, pid: int) -> SourceState:
    """Ask the running source what it is (preflight judges whether that can be upgraded)."""
    what = f"source (PID {pid})"
    queries: list[tuple[str, dict[str, Any] | None]] = [
        ("query-status", None), ("query-name", None), ("query-uuid", None),
        ("qom-get", {"path": "/machine", "property": "type"}), ("query-version", None),
        ("query-migrate", None), ("query-migrate-capabilities", None),
        ("query-migrate-parameters", None), ("query-target", None), ("query-kvm", None),
        ("query-memory-size-summary", None)]
    # Sent together: QMP answers in order, and one round trip beats eleven.
    (status, name, uuid_info, machine_class, version_info, migrate, caps, params, target,
     kvm, memory) = await asyncio.gather(
        *(monitor.execute(client, cmd, args, what=what) for cmd, args in queries))
    uuid = uuid_info["UUID"]
    version = QemuVersion.from_qmp(version_info)
    arch = target["arch"]
    machine = str(machine_class).removesuffix("-machine")
    return SourceState(
        status=status["status"], running=bool(status["running"]), name=name.get("name"),
        uuid=uuid, machine=machine, version=version,
        capabilities={c["capability"] for c in caps},
        parameters=params, migration_status=str(migrate.get("status", "none")), arch=arch,
        tcg=not kvm.get("enabled", False), ram_bytes=int(memory.get("base-memory", 0)),
    )


async def connect_source(proc: SourceProcess) -> QMPClient:
    try:
        return await monitor.connect(proc.qmp_path, f"source-{proc.pid}")
    except MonitorError as e:
        e.args = (f"VM {proc.pid}: {e}",)
        raise
