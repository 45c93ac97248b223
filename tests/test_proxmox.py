"""A Proxmox-shaped VM (the command line qemu-server writes; rig.vm._as_proxmox_writes_it)
upgraded end to end with its network, its monitors, its pidfile and its VNC socket."""

from __future__ import annotations

import asyncio
import time

import pytest

from liveupgrade.cmdline import CommandLine
from liveupgrade.report import UpgradeResult
from rig import FixturePaths, GuestKind, TapNetwork
from rig.probes import observe_upgrade, vnc_banner
from tests.conftest import VMFactory
from tests.helpers import QMPEventListener, assert_guest_intact, qemu_pids

pytestmark = pytest.mark.e2e


async def test_a_proxmox_shaped_vm_keeps_network_monitors_pidfile_and_vnc(
        fixtures: FixturePaths, make_vm: VMFactory, network: TapNetwork):
    vm = await make_vm(fixtures.qemu_old, guest=GuestKind.LINUX, ram_mib=512, network=network,
                       vnc=True, proxmox_vmid=100, name="vm100", heartbeat_us=10000,
                       daemonize=True)
    qmeventd = QMPEventListener(vm.qmeventd_path)
    await qmeventd.start()  # as on a host, after the VM: QEMU reconnects within 5 s
    try:
        deadline = time.monotonic() + 10
        while not qmeventd.connections:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (vm.dir / "bridge.log").read_text() == f"pve-bridge {network.tap}\n"
        # As Proxmox's tooling reaches a VM: its /var/run/qemu-server/<vmid>.qmp.
        seen = await observe_upgrade(vm, network, fixtures.qemu_new, str(vm.qmp_path))
        await asyncio.sleep(0.3)
    finally:
        await qmeventd.close()
    result = seen.action_result
    assert isinstance(result, UpgradeResult)
    assert seen.stream_faults == [] and seen.pings_lost <= 10, seen
    assert seen.accept_gaps_ms["qmp"] < 50, seen.accept_gaps_ms
    assert qemu_pids(vm) == [result.destination_pid]
    # Its monitor, pidfile and VNC socket are where qemu-server looks for them.
    async with vm.qmp() as q:
        assert (await q.execute("query-name"))["name"] == "vm100"
    assert vm.pidfile_path.read_text().strip() == str(result.destination_pid)
    reader, writer = await asyncio.open_unix_connection(str(vm.pve_path("vnc")))
    assert (await vnc_banner(reader)).startswith(b"RFB ")
    writer.close()
    # The identity qemu-server gave it (-smbios type=1,uuid=) is the new QEMU's too.
    argv = CommandLine.parse(result.destination_argv)
    smbios = argv.first("smbios")
    assert smbios is not None and smbios.value == f"type=1,uuid={vm.uuid}"
    # qmeventd saw the new QEMU connect before the old one went, and no SHUTDOWN.
    old, new = qmeventd.connections
    assert new.pid == result.destination_pid and old.closed is not None
    assert new.opened < old.closed and new.closed is None
    assert not {"SHUTDOWN", "POWERDOWN"} & {e for c in (old, new) for e, _ in c.events}
    # The old QEMU was killed, so pve-bridgedown never ran under the running guest.
    assert "pve-bridgedown" not in (vm.dir / "bridge.log").read_text()
    await assert_guest_intact(vm)
    print(f"\nproxmox-shaped vm100: {seen.pings_lost}/{seen.pings_sent} pings lost, TCP stall "
          f"{seen.longest_tcp_stall_ms:.0f} ms, QMP gap {seen.accept_gaps_ms['qmp']:.1f} ms, "
          f"guest pause {seen.guest_pause_ms:.0f} ms")
