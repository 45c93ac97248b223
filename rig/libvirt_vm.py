"""libvirt-managed fixture guests, for testing what liveupgrade does to libvirt VMs.

systemd is not PID 1 on the test machines, so `ensure_daemons` starts
virtlogd and libvirtd by hand (`-d`) when none runs, as an operator would.
`LibvirtFixtureVM` defines a persistent domain (so `virsh start` of a second
copy is a real possibility to guard against) running the microguest on the
old QEMU, with shared file memory backing and a virtio NIC on a tap libvirt
creates and passes by fd; its serial port connects to the rig's heartbeat
server.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import psutil

from liveupgrade.context import SourceContext, runnable_by
from liveupgrade.libvirt_domain import (
    SYSTEM_STATUS_DIR,
    SYSTEM_URI,
    Daemon,
    LibvirtVM,
    find,
    import_libvirt,
    status_pid,
)
from rig.heartbeat import HeartbeatServer
from rig.paths import FixturePaths, find_fixtures
from rig.vm import StartStop

QEMU_USER = "libvirt-qemu"  # Debian's libvirt runs QEMU as this user by default
DAEMON_READY_TIMEOUT = 30.0

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{ram_mib}</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <features><acpi/></features>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{kernel}</kernel>
    <cmdline>fill={fill} rate=0 hb={heartbeat_us}</cmdline>
  </os>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='unix'><source mode='connect' path='{hb}'/></serial>
    <interface type='ethernet'><model type='virtio'/></interface>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _running(name: str) -> bool:
    return any(p.info.get("name") == name for p in psutil.process_iter(["name"]))


KVM_DEVICE = Path("/dev/kvm")


def kvm_as_udev_sets_it() -> None:
    """/dev/kvm as Debian's udev rule makes it (0660 root:kvm), where no udev runs.

    Without it libvirt's QEMU user cannot open /dev/kvm, and libvirt 9.0 then
    finds its cached QEMU capabilities (probed by root, with KVM) invalid on
    every look-up ("KVM was enabled when probing ..., but it is not available
    now") and probes QEMU again, some ten times per domain definition: 43 s
    instead of 10 ms. The guests still run under TCG (the domain type is qemu).
    """
    with contextlib.suppress(OSError, KeyError):
        st = KVM_DEVICE.stat()
        kvm_gid = grp.getgrnam("kvm").gr_gid
        if st.st_gid != kvm_gid or st.st_mode & 0o660 != 0o660:
            os.chown(KVM_DEVICE, 0, kvm_gid)
            os.chmod(KVM_DEVICE, 0o660)


def ensure_daemons() -> list[str]:
    """Start virtlogd and libvirtd (daemonized) unless running; returns what was started."""
    kvm_as_udev_sets_it()
    started = []
    if not _running("virtlogd"):
        subprocess.run(["virtlogd", "-d"], check=True)
        started.append("virtlogd")
    if Daemon.find() is None:
        subprocess.run(["libvirtd", "-d"], check=True)
        started.append("libvirtd")
    libvirt = import_libvirt()
    deadline = time.monotonic() + DAEMON_READY_TIMEOUT
    while True:
        try:
            libvirt.open(SYSTEM_URI).close()
            return started
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class LibvirtFixtureVM(StartStop):
    """A persistent libvirt domain running the microguest; undefined at close."""

    def __init__(self, fixtures: FixturePaths | None = None, *, ram_mib: int = 256,
                 machine: str = "pc-i440fx-7.2", heartbeat_us: int = 2000):
        self.fixtures = fixtures or find_fixtures()
        self.name = f"lu-lv-{uuidlib.uuid4().hex[:8]}"
        self.uuid = str(uuidlib.uuid4())
        # 0711: libvirt's QEMU user may reach the files it is given, not list the folder.
        self.dir = Path(tempfile.mkdtemp(prefix="lu-lv-"))
        os.chmod(self.dir, 0o711)
        self.heartbeat = HeartbeatServer(self.dir / "hb.sock")
        self.ram_mib, self.machine, self.heartbeat_us = ram_mib, machine, heartbeat_us
        self.conn: Any = None
        self.dom: Any = None

    def xml(self) -> str:
        kernel = self.dir / "microguest.elf"
        return DOMAIN_XML.format(
            name=self.name, uuid=self.uuid, ram_mib=self.ram_mib, machine=self.machine,
            kernel=kernel, fill=32, heartbeat_us=self.heartbeat_us,
            emulator=Path(self.fixtures.qemu_old).resolve(), hb=self.heartbeat.path)

    async def start(self) -> None:
        await self.heartbeat.start()
        qemu = pwd.getpwnam(QEMU_USER)
        os.chown(self.heartbeat.path, qemu.pw_uid, qemu.pw_gid)
        shutil.copy(self.fixtures.microguest, self.dir / "microguest.elf")
        libvirt = import_libvirt()
        self.conn = libvirt.open(SYSTEM_URI)
        self.dom = self.conn.defineXML(self.xml())
        await asyncio.to_thread(self.dom.create)
        await self.heartbeat.wait_beats(1, 15)

    @property
    def managed(self) -> LibvirtVM:
        """libvirt's runtime view of the domain (pid, status file)."""
        status = SYSTEM_STATUS_DIR / f"{self.name}.xml"
        pid = status_pid(status)
        found = find(pid) if pid is not None else None
        assert found is not None, f"{status} names PID {pid}, which is not found"
        return found

    @property
    def pid(self) -> int:
        return self.managed.pid

    def reconnect(self) -> None:
        """A fresh connection and domain handle (after the daemon restarted)."""
        with contextlib.suppress(Exception):
            self.conn.close()
        self.conn = import_libvirt().open(SYSTEM_URI)
        self.dom = self.conn.lookupByName(self.name)

    def processes(self) -> list[psutil.Process]:
        """Live QEMU processes of this domain (by its UUID on the command line)."""
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            argv = proc.info.get("cmdline") or []
            if proc.info.get("status") == psutil.STATUS_ZOMBIE or not argv:
                continue
            if "qemu-system" in Path(argv[0]).name and any(self.uuid in arg for arg in argv):
                found.append(proc)
        return found

    async def close(self) -> None:
        libvirt = import_libvirt()
        with contextlib.suppress(Exception):
            self.reconnect()
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            if self.dom.isActive():
                self.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            self.dom.undefine()
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(Exception):
            self.conn.close()
        await self.heartbeat.close()
        shutil.rmtree(self.dir, ignore_errors=True)


PUBLIC_DEPS = Path("/var/lib/liveupgrade-rig")


def qemu_for(binary: Path, user: str = QEMU_USER) -> Path:
    """A path to the QEMU `binary` (setup.sh's wrapper) that `user` can execute.

    The repository may live where libvirt's QEMU user cannot go (a clone under
    /root, 0700). Then the wrapper's extracted QEMU tree is mirrored, with hard
    links where the filesystem allows, under a world-traversable folder, with
    a wrapper of its own. The real engine refuses such a target in preflight
    (target-access); this is the rig making its own QEMU reachable.
    """
    account = pwd.getpwnam(user)
    as_user = SourceContext(pid=0, uid=account.pw_uid, gid=account.pw_gid,
                            groups=os.getgrouplist(user, account.pw_gid))
    if not runnable_by(as_user, [str(binary)]):
        return binary
    lines = binary.read_text().splitlines()
    real = Path(next(line.split()[1] for line in lines if line.startswith("exec ")))
    modules = next(line.split("=", 1)[1] for line in lines if line.startswith("QEMU_MODULE_DIR="))
    root = real.parents[2]  # .../root/usr/bin/qemu-system-x86_64 -> .../root
    mirror = PUBLIC_DEPS / binary.name
    stamp = mirror / ".source"
    if not stamp.exists() or stamp.read_text() != f"{root}:{root.stat().st_mtime_ns}":
        shutil.rmtree(mirror, ignore_errors=True)
        mirror.mkdir(parents=True, mode=0o755)
        os.chmod(PUBLIC_DEPS, 0o755)
        if subprocess.run(["cp", "-al", str(root), str(mirror / "root")],
                          capture_output=True).returncode != 0:
            subprocess.run(["cp", "-a", str(root), str(mirror / "root")], check=True)
        stamp.write_text(f"{root}:{root.stat().st_mtime_ns}")
    wrapper = mirror / "qemu"
    wrapper.write_text(
        "#!/bin/sh\n# The rig's copy of " + str(binary) + ", reachable by " + user + ".\n"
        f"QEMU_MODULE_DIR={str(modules).replace(str(root), str(mirror / 'root'))}\n"
        "export QEMU_MODULE_DIR\n"
        f"exec {str(real).replace(str(root), str(mirror / 'root'))} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper
