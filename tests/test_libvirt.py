"""End to end against a real libvirt 9.0 daemon (issue 7).

A persistent domain (shared file memory backing, the microguest on QEMU 7.2)
is upgraded to 10.0 with --libvirt-adopt; afterwards libvirt must manage the
new process as its own (state, pid, monitor pass-through, suspend, resume,
destroy), and at no moment may `virsh start` launch a second copy. A failure
before switchover must leave libvirt's view and the guest as they were.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from liveupgrade import cprexec, engine
from liveupgrade.cmdline import CommandLine
from liveupgrade.errors import LiveUpgradeError
from liveupgrade.handover import SourceFds
from liveupgrade.report import UpgradeEvent
from liveupgrade.versions import QemuVersion
from rig.libvirt_vm import LibvirtFixtureVM
from tests.helpers import assert_guest_intact, is_running
from tests.test_network import tap_fds


def qmp_through_libvirt(vm: LibvirtFixtureVM, command: str) -> object:
    import libvirt_qemu

    return json.loads(libvirt_qemu.qemuMonitorCommand(
        vm.dom, json.dumps({"execute": command}), 0))["return"]


class SecondCopyProbe:
    """Tries `virsh start` of the domain over and over, on fresh connections."""

    def __init__(self, name: str):
        self.name = name
        self.attempts = 0
        self.refusals: set[str] = set()
        self.started = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import libvirt

        while not self._stop.is_set():
            self.attempts += 1
            try:
                conn = libvirt.open("qemu:///system")
                try:
                    conn.lookupByName(self.name).create()
                    self.started += 1
                finally:
                    conn.close()
            except libvirt.libvirtError as e:
                self.refusals.add(e.get_error_message().split(":")[0])
            self._stop.wait(0.02)

    def __enter__(self) -> SecondCopyProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def second_copy(lvm: LibvirtFixtureVM) -> Iterator[SecondCopyProbe]:
    with SecondCopyProbe(lvm.name) as probe:
        yield probe


async def test_list_shows_the_libvirt_domain_and_plan_asks_for_the_opt_in(
        lvm: LibvirtFixtureVM, libvirt_qemu_new: Path, tmp_path: Path):
    from liveupgrade import inventory

    vms = {v.pid: v for v in await inventory.list_vms()}
    info = vms[lvm.pid]
    assert info.libvirt_domain == lvm.name and info.libvirt_uri == "qemu:///system"
    assert info.version and info.version.startswith("7.2")  # asked through libvirt
    status_before = lvm.managed.status_path.read_bytes()
    report = await engine.plan(lvm.pid, libvirt_qemu_new)
    check = next(c for c in report.preflight.checks if c.name == "libvirt")
    assert not check.ok and "virDomainQemuAttach" in check.detail
    assert "--libvirt-adopt" in check.fix
    with pytest.raises(LiveUpgradeError, match="libvirt"):
        await engine.upgrade(lvm.pid, libvirt_qemu_new)
    assert lvm.managed.status_path.read_bytes() == status_before
    assert lvm.dom.isActive() and len(lvm.processes()) == 1
    # A target the VM's user (libvirt-qemu) cannot execute is refused before anything starts.
    private = tmp_path / "qemu"  # pytest's tmp folders are 0700 root
    private.write_text(f'#!/bin/sh\nexec {libvirt_qemu_new} "$@"\n')
    private.chmod(0o755)
    report = await engine.plan(lvm.pid, private, libvirt_adopt=True)
    access = next(c for c in report.preflight.checks if c.name == "target-access")
    assert not access.ok and "cannot execute" in access.detail and str(private) in access.detail
    # Its anonymous RAM is not converted behind libvirt's back: plan says what the XML needs.
    report = await engine.plan(lvm.pid, libvirt_qemu_new, libvirt_adopt=True, convert_ram="")
    conversion = next(c for c in report.preflight.checks if c.name == "ram-conversion")
    assert not conversion.ok and "libvirt VMs are not converted" in conversion.detail
    assert "<memoryBacking>" in conversion.fix and "access mode='shared'" in conversion.fix
    # cpr-exec: libvirt's own command line forbids the exec (-sandbox ...,spawn=deny).
    cmdline = CommandLine.parse(psutil.Process(lvm.pid).cmdline())
    why = cprexec.blockers(cmdline, SourceFds(), libvirt=True)
    assert any("spawn=deny, which forbids the exec" in b for b in why), why
    assert any("not for libvirt VMs" in b for b in why), why
    assert lvm.managed.status_path.read_bytes() == status_before


async def test_adopt_hands_the_new_qemu_to_libvirt(
        lvm: LibvirtFixtureVM, libvirt_qemu_new: Path, second_copy: SecondCopyProbe):
    old_pid, dom_id = lvm.pid, lvm.dom.ID()
    taps_before = tap_fds(old_pid)
    switchover: list[float] = []

    def note(event: UpgradeEvent) -> None:
        if event.phase == "switchover" and not switchover:
            switchover.append(time.monotonic())

    result = await engine.upgrade(old_pid, libvirt_qemu_new, libvirt_adopt=True, on_event=note)
    second_copy.__exit__()
    assert not is_running(old_pid)
    assert [p.pid for p in lvm.processes()] == [result.destination_pid]
    # The tap libvirt created and passed by fd is the new QEMU's, under the same name.
    assert tap_fds(result.destination_pid) == taps_before and taps_before[0].startswith("vnet")
    assert any(h.startswith("tap netdev") for h in result.handed_over)
    # libvirt's view: the same domain, running, on the new process and binary.
    lvm.reconnect()
    import libvirt

    assert lvm.dom.ID() == dom_id and lvm.dom.UUIDString() == lvm.uuid
    assert lvm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert lvm.pid == result.destination_pid
    version = qmp_through_libvirt(lvm, "query-version")
    assert QemuVersion.from_qmp(version).at_least(10)  # type: ignore[arg-type]
    assert qmp_through_libvirt(lvm, "query-uuid") == {"UUID": lvm.uuid}
    # At no moment could a second copy start: the daemon was down or said "active".
    assert second_copy.attempts > 10 and second_copy.started == 0, second_copy.refusals
    await assert_guest_intact(lvm)  # type: ignore[arg-type]
    pause_ms = lvm.heartbeat.log.max_gap(switchover[0], switchover[0]).seconds * 1e3
    # libvirt drives the new process: suspend stops the guest, resume restarts it.
    await asyncio.to_thread(lvm.dom.suspend)
    assert lvm.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    await asyncio.sleep(0.3)
    paused_at = len(lvm.heartbeat.log.beats)
    await asyncio.sleep(0.5)
    assert len(lvm.heartbeat.log.beats) == paused_at
    await asyncio.to_thread(lvm.dom.resume)
    await lvm.heartbeat.wait_beats(50, 10)
    with pytest.raises(libvirt.libvirtError, match=r"already (active|running)"):
        lvm.dom.create()
    # destroy acts on the new process, and libvirt cleans up after it.
    ram_dir = Path(f"/var/lib/libvirt/qemu/ram/{dom_id}-{lvm.name}")
    assert ram_dir.exists()
    await asyncio.to_thread(lvm.dom.destroy)
    assert not is_running(result.destination_pid)
    assert not ram_dir.exists() and lvm.processes() == []
    assert any("adopted by" in h for h in result.handed_over)
    print(f"\nlibvirt adopt: guest pause {pause_ms:.1f} ms, "
          f"QEMU downtime {result.downtime_ms} ms, phases {result.phases_ms}; "
          f"'virsh start' tried {second_copy.attempts} times during the upgrade, started 0, "
          f"refused with: {sorted(second_copy.refusals)}")


async def test_a_failure_before_switchover_leaves_libvirt_and_the_guest_as_before(
        lvm: LibvirtFixtureVM, libvirt_qemu_new: Path):
    """A target whose machine type differs fails to load the state: roll back, daemon back."""
    wrapper = lvm.dir / "qemu-wrong-machine"  # where libvirt's QEMU user can run it
    wrapper.write_text(f'#!/bin/sh\nexec {libvirt_qemu_new} "$@" -machine pc-i440fx-7.1\n')
    wrapper.chmod(0o755)
    old_pid, dom_id = lvm.pid, lvm.dom.ID()
    with pytest.raises(LiveUpgradeError, match="Machine type received") as failure:
        await engine.upgrade(old_pid, wrapper, libvirt_adopt=True)
    print(f"\nrefused as expected: {failure.value}")
    lvm.reconnect()
    import libvirt

    assert lvm.pid == old_pid and lvm.dom.ID() == dom_id
    assert lvm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert [p.pid for p in lvm.processes()] == [old_pid]
    version = qmp_through_libvirt(lvm, "query-version")
    assert not QemuVersion.from_qmp(version).at_least(10)  # type: ignore[arg-type]
    await assert_guest_intact(lvm)  # type: ignore[arg-type]
