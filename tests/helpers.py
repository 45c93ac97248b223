"""Checks a user of the guest would make after an upgrade."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from liveupgrade import journal
from rig import FixturePaths, FixtureVM


async def assert_guest_intact(vm: FixtureVM) -> None:
    """The guest kept counting and a whole memory verify pass found nothing wrong."""
    last = vm.heartbeat.log.last
    assert last is not None
    await vm.heartbeat.wait_for(lambda log: bool(log.last and log.last.passes >= last.passes + 2),
                                60)
    log = vm.heartbeat.log
    assert log.sequence_faults() == [], log.sequence_faults()
    assert log.last is not None and log.last.errors == 0, log.error_lines
    assert log.error_lines == []


def qemu_pids(vm: FixtureVM) -> list[int]:
    return sorted(p.pid for p in vm.processes())


def leftovers(vm: FixtureVM) -> list[str]:
    """Private folders the engine made beside the VM's sockets and did not remove."""
    return [name for name in os.listdir(vm.dir) if name.startswith(".liveupgrade-")]


def exe_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


def is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def runtime_dirs() -> list[Path]:
    base = Path("/run/liveupgrade")
    return sorted(base.glob("upgrade-*")) if base.exists() else []


def installed_copy(fixtures: FixturePaths, tmp_path: Path) -> tuple[Path, Path]:
    """QEMU 7.2 "installed" under tmp_path, so a test can replace it as a package would.

    A QEMU away from /usr finds neither its modules nor its firmware by itself:
    the wrapper points it at the system's.
    """
    binary = tmp_path / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir()
    shutil.copy2(os.path.realpath(fixtures.qemu_old), binary)
    wrapper = tmp_path / "qemu"
    dirs = " ".join(f"-L {d}" for d in ("/usr/share/qemu", "/usr/share/seabios",
                                          "/usr/lib/ipxe/qemu"))
    wrapper.write_text("#!/bin/sh\nQEMU_MODULE_DIR=/usr/lib/x86_64-linux-gnu/qemu "
                       f"exec {binary} {dirs} \"$@\"\n")
    wrapper.chmod(0o755)
    return binary, wrapper


def relocatable_qemu(prefix: Path) -> Path:
    """Debian's QEMU 7.2 "installed" under prefix/bin, as a package would put it.

    Debian's QEMU finds its modules and firmware relative to its own binary
    (../lib/x86_64-linux-gnu/qemu, ../share/qemu, ...): those folders are
    linked to the system's, so the copy runs with no wrapper and /proc/PID/exe
    is this path, which a test can then replace as a package upgrade does.
    """
    binary = prefix / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/qemu-system-x86_64", binary)
    for system in ("lib/x86_64-linux-gnu/qemu", "share/qemu", "share/seabios", "lib/ipxe/qemu"):
        link = prefix / system
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("/usr") / system)
    return binary


def replace_as_a_package_would(binary: Path) -> None:
    """A package upgrade: the new file is written beside and renamed over the old one."""
    fresh = binary.with_name(f".{binary.name}.new")
    shutil.copy2(binary, fresh)
    fresh.replace(binary)


@dataclass
class Connection:
    pid: int
    opened: float
    closed: float | None = None
    events: list[tuple[str, float]] = field(default_factory=list)


class QMPEventListener:
    """Listens where the VM's client-mode monitor connects; speaks QMP as its client
    (answers the greeting with qmp_capabilities) and records every event per connection,
    with the connecting process (SO_PEERCRED) and when it closed."""

    def __init__(self, path: Path):
        self.path = path
        self.connections: list[Connection] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
        conn = Connection(pid, time.monotonic())
        self.connections.append(conn)
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if "QMP" in message:
                    writer.write(b'{"execute": "qmp_capabilities"}\n')
                    await writer.drain()
                elif "event" in message:
                    conn.events.append((message["event"], time.monotonic()))
        except (ConnectionError, ValueError):
            pass
        finally:
            conn.closed = time.monotonic()
            writer.close()


# The tool as a process, and what it leaves while an upgrade or its repair runs
# (tests/test_transaction.py, and the network test that kills it).
KEEPER_DEADLINE = 10.0  # the bound: the job is finished within 10 s of the death


def keepers() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "liveupgrade.keeper" in " ".join(p.info.get("cmdline") or [])]


def transaction_files() -> list[str]:
    return sorted(p.name for p in journal.transactions_dir().iterdir())


async def cli(*args: str, fault: str | None = None) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    if fault:
        env[journal.FAULT_ENV] = fault
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "liveupgrade", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def settled(deadline: float = KEEPER_DEADLINE) -> float:
    """Seconds until no keeper runs and no journal or lock is left (fails past deadline)."""
    started = time.monotonic()
    while keepers() or transaction_files():
        assert time.monotonic() - started < deadline, (keepers(), transaction_files())
        await asyncio.sleep(0.02)
    return time.monotonic() - started
