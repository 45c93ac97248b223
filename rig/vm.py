"""Start, reach and tear down a fixture guest under real QEMU."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import psutil
from qemu.qmp import QMPClient

from liveupgrade.procs import alive, wait_gone
from rig.heartbeat import HeartbeatServer
from rig.netns import TapNetwork
from rig.paths import FixturePaths, find_fixtures


class GuestKind(enum.Enum):
    MICRO = "microguest"
    LINUX = "linuxguest"


class MemoryBacking(enum.Enum):
    ANONYMOUS = "anonymous"
    FILE = "file"  # memory-backend-file,share=on in the VM's /dev/shm folder
    MEMFD = "memfd"  # memory-backend-memfd,share=on


@dataclass
class VMConfig:
    """What to boot and how; defaults give a small, fast microguest."""

    binary: Path
    guest: GuestKind = GuestKind.MICRO
    ram_mib: int = 256
    backing: MemoryBacking = MemoryBacking.FILE
    machine: str = "pc-i440fx-7.2"
    accel: str = "tcg"
    fill_mib: int = 32
    dirty_rate_mib: int = 0
    heartbeat_us: int = 2000
    aux_ram_share: bool = False
    name: str = "lu-fixture"
    extra_args: list[str] = field(default_factory=list)
    # Operator-style extras: a virtio-net NIC on a tap in `network` (QEMU runs in
    # that namespace; it opens the tap by name, or gets an fd as libvirt passes it),
    # the serial console on a unix socket server, a VNC display, a -D log.
    network: TapNetwork | None = None
    tap: str = "ifname"  # "ifname", "fd" (opened by a manager), "qemu" (QEMU creates one),
    #                      "mq" (`queues` queues on a multi_queue tap)
    queues: int = 2
    smp: int = 1  # vCPUs: a Linux guest's virtio-net uses min(queues, vCPUs) queue pairs
    vhost: bool = False  # vhost=on on the tap netdev (needs /dev/vhost-net)
    console_socket: bool = False
    vnc: bool = False
    debug_log: bool = False
    pidfile: bool = False  # -pidfile in the VM's folder, as managers write one
    daemonize: bool = False  # -daemonize (with -pidfile): the VM is QEMU's forked child
    # The command line Proxmox's qemu-server writes for VM <vmid> (see proxmox_argv), with
    # its /var/run paths moved into the VM's folder.
    proxmox_vmid: int | None = None


class GuestStartError(RuntimeError):
    """QEMU exited or the guest never sent a heartbeat; carries QEMU's log."""


async def _gone(pid: int) -> int:
    """Wait until a process that is not our child has exited (its last thread too)."""
    while alive(pid):
        await asyncio.sleep(0.05)
    return -1


class StartStop:
    """`async with` for rig guests: start, and close even when start fails halfway."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class FixtureVM(StartStop):
    """One fixture guest: its QEMU process, private folder and heartbeat reader.

    Everything it creates lives in one 0700 folder, and teardown kills every
    process whose command line names that folder, so the destination QEMU an
    upgrade started from this VM's command line is cleaned up too.
    """

    def __init__(self, config: VMConfig, fixtures: FixturePaths | None = None):
        self.config = config
        self.fixtures = fixtures or find_fixtures()
        self.uuid = str(uuidlib.uuid4())
        self.dir = Path(tempfile.mkdtemp(prefix="lu-vm-", dir="/dev/shm"))
        self.qmp_path = self.dir / "qmp.sock"
        if config.proxmox_vmid is not None:
            (self.dir / "qemu-server").mkdir()
            self.qmp_path = self.pve_path("qmp")
        self.heartbeat = HeartbeatServer(self.dir / "hb.sock")
        self.process: asyncio.subprocess.Process | None = None
        self.boot_seconds: float | None = None
        self.tap_fd: int | None = None
        self.daemon_pid: int | None = None

    @property
    def ram_file(self) -> Path:
        return self.dir / "guest-ram"

    @property
    def disk_path(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def console_path(self) -> Path:
        return self.dir / "console.sock"

    @property
    def pidfile_path(self) -> Path:
        if self.config.proxmox_vmid is not None:
            return self.pve_path("pid")
        return self.dir / "qemu.pid"

    def pve_path(self, kind: str) -> Path:
        """/var/run/qemu-server/<vmid>.<kind>, in the VM's folder."""
        return self.dir / "qemu-server" / f"{self.config.proxmox_vmid}.{kind}"

    @property
    def qmeventd_path(self) -> Path:
        """Where Proxmox's qmeventd listens (/var/run/qmeventd.sock), in the VM's folder."""
        return self.dir / "qmeventd.sock"

    @property
    def debug_log_path(self) -> Path:
        return self.dir / "qemu-debug.log"

    VNC_PORT = 5900  # display :0 on 127.0.0.1 inside the VM's own network namespace

    @property
    def pid(self) -> int:
        """The VM's QEMU: the process started, or with -daemonize the child it forked."""
        if self.daemon_pid is not None:
            return self.daemon_pid
        assert self.process is not None
        return self.process.pid

    def argv(self) -> list[str]:
        """The QEMU command line, written as an operator would write it."""
        c = self.config
        machine = f"{c.machine},accel={c.accel}"
        args = [str(c.binary), "-name", c.name, "-uuid", self.uuid, "-m", f"{c.ram_mib}M",
                "-smp", str(c.smp), "-nodefaults", "-no-user-config", "-display", "none",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if c.backing is MemoryBacking.FILE:
            args += ["-object", f"memory-backend-file,id=pc.ram,size={c.ram_mib}M,"
                     f"mem-path={self.ram_file},share=on"]
            machine += ",memory-backend=pc.ram"
        elif c.backing is MemoryBacking.MEMFD:
            args += ["-object", f"memory-backend-memfd,id=pc.ram,size={c.ram_mib}M,share=on"]
            machine += ",memory-backend=pc.ram"
        if c.aux_ram_share:
            machine += ",aux-ram-share=on"
        args += ["-machine", machine, "-chardev", f"socket,id=hb,path={self.heartbeat.path}"]
        if c.network is not None:
            tap = {"fd": f"tap,id=net0,fd={self.tap_fd}",
                   "qemu": "tap,id=net0,script=no,downscript=no",
                   "ifname": f"tap,id=net0,ifname={c.network.tap},script=no,downscript=no",
                   "mq": f"tap,id=net0,ifname={c.network.tap},script=no,downscript=no,"
                         f"queues={c.queues}",
                   }[c.tap]
            mq = f",mq=on,vectors={2 * c.queues + 2}" if c.tap == "mq" else ""
            tap += ",vhost=on" if c.vhost else ""
            args += ["-netdev", tap,
                     "-device", f"virtio-net-pci,netdev=net0,mac={c.network.guest_mac}{mq}"]
        if c.vnc:
            args += ["-vnc", "127.0.0.1:0"]
        if c.proxmox_vmid is not None:
            args = self._as_proxmox_writes_it(args)
        if c.debug_log:
            args += ["-D", str(self.debug_log_path), "-d", "guest_errors"]
        if c.pidfile or c.daemonize:
            args += ["-pidfile", str(self.pidfile_path)]
        if c.daemonize:
            args += ["-daemonize"]
        if c.guest is GuestKind.MICRO:
            args += ["-serial", "chardev:hb", "-kernel", str(self.fixtures.microguest),
                     "-append", f"fill={c.fill_mib} rate={c.dirty_rate_mib} hb={c.heartbeat_us}"]
        else:
            console = (f"socket,id=console,path={self.console_path},server=on,wait=off"
                       if c.console_socket else
                       f"file,id=console,path={self.dir / 'console.log'},append=on")
            net = (f" lg.ip={c.network.guest_ip}/{c.network.prefix}"
                   if c.network is not None else "")
            args += [
                "-chardev", console,
                "-serial", "chardev:console",
                "-kernel", str(self.fixtures.linux_kernel),
                "-initrd", str(self.fixtures.linux_initrd),
                "-append", f"console=ttyS0 quiet lg.fill={c.fill_mib} lg.rate={c.dirty_rate_mib} "
                           f"lg.hb={c.heartbeat_us}{net}",
                "-device", "virtio-serial-pci,id=vser0",
                "-device", "virtserialport,chardev=hb,name=liveupgrade.hb",
                "-drive", f"file={self.disk_path},if=none,id=disk0,format=qcow2",
                "-device", "virtio-blk-pci,drive=disk0,id=vblk0",
            ]
        return args + c.extra_args

    def _as_proxmox_writes_it(self, args: list[str]) -> list[str]:
        """What qemu-server (Proxmox VE 8) writes, on the options it shares with us.

        Its QMP monitor as a chardev + -mon; a second, client-mode monitor to
        qmeventd (reconnect=5); -pidfile and -vnc unix: under /var/run/qemu-server;
        -name with debug-threads; the UUID as -smbios type=1 (no -uuid); -no-shutdown;
        -boot; a balloon; the tap by ifname with pve-bridge/pve-bridgedown scripts.
        Adapted where this machine forces it: no -id and no "+pve0" machine suffix
        (Proxmox's own QEMU patches), TCG instead of -cpu kvm64,enforce, no vhost=on
        (no /dev/vhost-net). -daemonize is the test's choice (VMConfig.daemonize).
        """
        out: list[str] = []
        for before, arg in zip(["", *args], args, strict=False):
            if "-qmp" in (before, arg):  # the monitor is a chardev + -mon below
                continue
            if before == "-name":
                arg = f"{arg},debug-threads=on"
            elif before == "-uuid":
                out[-1] = "-smbios"
                arg = f"type=1,uuid={self.uuid}"
            elif arg.startswith("tap,id=net0,ifname="):
                arg = (f"type=tap,id=net0,ifname={self.config.network.tap},"  # type: ignore[union-attr]
                       f"script={self._bridge_script('pve-bridge')},"
                       f"downscript={self._bridge_script('pve-bridgedown')}")
            elif before == "-vnc":
                arg = f"unix:{self.pve_path('vnc')}"
            out.append(arg)
        return [
            *out,
            "-chardev", f"socket,id=qmp,path={self.qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=qmp-event,path={self.qmeventd_path},reconnect=5",
            "-mon", "chardev=qmp-event,mode=control",
            "-pidfile", str(self.pidfile_path), "-no-shutdown",
            "-boot", "menu=on,strict=on,reboot-timeout=1000",
            "-device", "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3"]

    def _bridge_script(self, name: str) -> Path:
        """A stand-in for /var/lib/qemu-server/pve-bridge: records its calls, succeeds."""
        script = self.dir / name
        if not script.exists():
            script.write_text(f'#!/bin/sh\necho "{name} $*" >> {self.dir / "bridge.log"}\n')
            script.chmod(0o755)
        return script

    async def start(self, boot_timeout: float | None = None) -> None:
        """Boot the guest and return once its first heartbeat has arrived."""
        await self.heartbeat.start()
        if self.config.guest is GuestKind.LINUX:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.disk_path), "64M"],
                           check=True)
        log = (self.dir / "qemu.log").open("wb")
        net = self.config.network
        if net is not None and self.config.tap == "fd":
            self.tap_fd = net.open_tap()
        started = time.monotonic()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, pass_fds=[self.tap_fd] if self.tap_fd else [],
                preexec_fn=net.preexec() if net is not None else None)
        finally:
            log.close()
            if self.tap_fd is not None:
                os.close(self.tap_fd)  # QEMU has its own copy now
        if self.config.daemonize:  # the parent exits once the daemon runs
            if await asyncio.wait_for(self.process.wait(), 30) != 0:
                raise GuestStartError(f"QEMU -daemonize failed: {self.qemu_log()}")
            self.daemon_pid = int(self.pidfile_path.read_text())
        timeout = boot_timeout or (15.0 if self.config.guest is GuestKind.MICRO else 90.0)
        beat = asyncio.ensure_future(self.heartbeat.wait_beats(1, timeout))
        exited = asyncio.ensure_future(self.process.wait() if self.daemon_pid is None
                                       else _gone(self.daemon_pid))
        done, _ = await asyncio.wait({beat, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited in done:
            beat.cancel()
            raise GuestStartError(f"QEMU exited with {self.process.returncode}: {self.qemu_log()}")
        exited.cancel()
        try:
            beat.result()
        except TimeoutError as e:
            raise GuestStartError(f"{e}; QEMU log: {self.qemu_log()}") from e
        self.boot_seconds = self.heartbeat.log.beats[0].host_time - started

    def qemu_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "qemu.log").read_text(errors="replace").strip()
        return ""

    @contextlib.asynccontextmanager
    async def qmp(self, path: Path | None = None) -> AsyncIterator[QMPClient]:
        """A short-lived QMP connection (QEMU serves one client per monitor)."""
        client = QMPClient(self.config.name)
        await client.connect(str(path or self.qmp_path))
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):  # e.g. EOF after a quit
                await client.disconnect()

    def processes(self) -> list[psutil.Process]:
        """Every live process whose command line names this VM's folder."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if any(str(self.dir) in arg for arg in cmdline):
                found.append(proc)
        return found

    async def close(self) -> None:
        """Kill every QEMU of this VM and remove all its files and sockets."""
        own = self.process.pid if self.process is not None else None
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        # Children of this process (the VM's QEMU, and a destination the engine
        # started here) are reaped by asyncio's child watcher, so psutil must not
        # reap them too: for those, wait until they are zombies or gone.
        mine = {c.pid for c in psutil.Process().children()}
        await asyncio.to_thread(psutil.wait_procs, [p for p in procs if p.pid not in mine], 5)
        await asyncio.to_thread(wait_gone,
                                [p.pid for p in procs if p.pid in mine and p.pid != own], 5.0)
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        await self.heartbeat.close()
        shutil.rmtree(self.dir, ignore_errors=True)

