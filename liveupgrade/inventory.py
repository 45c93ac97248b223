"""`liveupgrade list`: every QEMU on the host, and whether it runs stale code.

Stale is decided the way needrestart decides it: the process's executable,
or a shared library it has mapped, is no longer the file at that path on disk
(deleted, or replaced by a package upgrade).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from liveupgrade import journal, libvirt_domain, monitor, source
from liveupgrade.cmdline import CommandLine
from liveupgrade.endpoints import qmp_paths
from liveupgrade.handover import fd_qmp_paths
from liveupgrade.memory import layout
from liveupgrade.modes import CPR_EXEC_SINCE
from liveupgrade.versions import QemuVersion

QUICK_QMP_TIMEOUT = 1.0


@dataclass
class VMInfo:
    pid: int
    name: str | None
    uuid: str | None
    binary: str
    version: str | None
    stale: bool
    stale_reasons: list[str] = field(default_factory=list)
    qmp: str | None = None
    memory: str = ""
    accel: str = "tcg"
    modes: list[str] = field(default_factory=list)
    note: str = ""
    managed_by: str | None = None  # "libvirt: NAME on URI"
    libvirt_domain: str | None = None
    libvirt_uri: str | None = None
    upgrade: str | None = None  # an upgrade in progress or interrupted (journal.describe)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def stale_reasons(pid: int) -> list[str]:
    """Why the process runs code that is no longer on disk (empty: it is current)."""
    reasons = []
    exe_link = os.readlink(f"/proc/{pid}/exe")
    if exe_link.endswith(" (deleted)"):
        reasons.append(f"binary {exe_link.removesuffix(' (deleted)')} was deleted or replaced")
    else:
        with contextlib.suppress(OSError):
            if os.stat(exe_link).st_ino != os.stat(f"/proc/{pid}/exe").st_ino:
                reasons.append(f"binary {exe_link} was replaced")
    libs: set[str] = set()
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            lib = path.removesuffix(" (deleted)")
            if ".so" not in os.path.basename(lib) or lib in libs:
                continue
            if path.endswith(" (deleted)"):
                libs.add(lib)
                continue
            with contextlib.suppress(OSError):
                if os.stat(lib).st_ino != int(parts[4]):
                    libs.add(lib)
    reasons += [f"library {lib} was replaced" for lib in sorted(libs)]
    return reasons


def _accel(cmd: CommandLine) -> str:
    if cmd.has("enable-kvm") or "kvm" in (cmd.machine_prop("accel") or ""):
        return "kvm"
    accel = cmd.first("accel")
    return "kvm" if accel is not None and accel.prop("accel") == "kvm" else "tcg"


def possible_modes(cmd: CommandLine, version: QemuVersion | None, accel: str) -> list[str]:
    """Modes an upgrade to the same or a newer QEMU could use for this VM."""
    mem = layout(cmd)
    modes = []
    if version is not None and version.at_least(10) and mem.all_shared and mem.aux_ram_share:
        modes.append("cpr-transfer")
        if (version.major, version.minor) >= CPR_EXEC_SINCE:
            modes.append("cpr-exec")
    if mem.all_in_shared_files:
        modes.append("shared")
    if not (accel == "tcg" and version is not None and not version.at_least(9)):
        modes.append("copy")
    return modes


async def _version(path: str | None) -> QemuVersion | None:
    if path is None:
        return None
    with contextlib.suppress(Exception):
        client = await monitor.connect(Path(path), "liveupgrade-list", QUICK_QMP_TIMEOUT)
        try:
            return QemuVersion.from_qmp(await monitor.execute(client, "query-version"))
        finally:
            await client.disconnect()
    return None


async def describe(proc: psutil.Process,
                   transactions: list[journal.Journal] | None = None) -> VMInfo | None:
    try:
        argv = proc.cmdline()
        exe = os.readlink(f"/proc/{proc.pid}/exe")
    except (psutil.Error, OSError):
        return None
    cmd = CommandLine.parse(argv)
    qmps = qmp_paths(cmd) or fd_qmp_paths(proc.pid, cmd)
    qmp = str(qmps[0]) if qmps else None
    managed = libvirt_domain.find(proc.pid)
    version = await (_libvirt_version(managed) if managed else _version(qmp))
    name_opt, uuid_opt = cmd.first("name"), cmd.first("uuid")
    transactions = journal.journals() if transactions is None else transactions
    key = journal.key_of(cmd, proc.pid)
    as_destination = journal.destination_of(argv, proc.pid, transactions)
    upgrade = (f"new QEMU of VM {as_destination.label}: {journal.describe(as_destination)}"
               if as_destination else
               next((journal.describe(t) for t in transactions
                     if t.key == key or t.facts.get("source", {}).get("pid") == proc.pid), None))
    reasons = stale_reasons(proc.pid)
    accel = _accel(cmd)
    return VMInfo(
        pid=proc.pid, name=name_opt.prop("guest") if name_opt else None,
        uuid=uuid_opt.value if uuid_opt else None, binary=exe.removesuffix(" (deleted)"),
        version=str(version) if version else None, stale=bool(reasons), stale_reasons=reasons,
        qmp=qmp, memory=layout(cmd).summary, accel=accel,
        modes=possible_modes(cmd, version, accel),
        note=("managed by libvirt: upgrade with --libvirt-adopt (docs/libvirt.md)" if managed
              else "" if qmp else "no QMP unix socket on its command line"),
        managed_by=f"libvirt: {managed.name} on {managed.uri}" if managed else None,
        libvirt_domain=managed.name if managed else None,
        libvirt_uri=managed.uri if managed else None, upgrade=upgrade)


async def _libvirt_version(vm: libvirt_domain.LibvirtVM) -> QemuVersion | None:
    """libvirt owns the monitor: ask through it (None if libvirt is not reachable)."""
    with contextlib.suppress(Exception):
        client = await asyncio.wait_for(asyncio.to_thread(libvirt_domain.LibvirtMonitor, vm),
                                        QUICK_QMP_TIMEOUT)
        try:
            return QemuVersion.from_qmp(await asyncio.wait_for(
                monitor.execute(client, "query-version"), QUICK_QMP_TIMEOUT))
        finally:
            await client.disconnect()
    return None


async def list_vms() -> list[VMInfo]:
    procs = await asyncio.to_thread(source.qemu_processes)
    transactions = journal.journals()
    found = await asyncio.gather(*(describe(p, transactions) for p in procs))
    return sorted((v for v in found if v is not None), key=lambda v: v.pid)
