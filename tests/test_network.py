"""End to end: a VM's NIC, consoles and display survive an upgrade (issue 5).

The guest runs with a virtio-net NIC on a tap device in a network namespace
the test creates; the host side talks to it over TCP and ping. What a user
would check: the TCP connection carries on without a reset or a lost byte,
pings get answered, and the console/QMP sockets and the VNC port keep
accepting clients.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from liveupgrade import engine
from liveupgrade.cmdline import CommandLine
from liveupgrade.fdpass import open_fds
from liveupgrade.report import UpgradeResult
from rig import FixturePaths, GuestKind, MemoryBacking, TapNetwork
from rig.probes import ECHO_PORT, observe_upgrade, vnc_banner
from tests.conftest import VMFactory
from tests.helpers import assert_guest_intact, cli, qemu_pids, settled

PINGS = 300  # 3 s at 100/s, around the upgrade


def tap_fds(pid: int) -> list[str]:
    return [f.tun_ifname or "?" for f in open_fds(pid) if f.target == "/dev/net/tun"]


async def test_tcp_ping_consoles_and_vnc_survive_an_upgrade(
        fixtures: FixturePaths, make_vm: VMFactory, network: TapNetwork):
    vm = await make_vm(fixtures.qemu_old, guest=GuestKind.LINUX, ram_mib=512, network=network,
                       console_socket=True, vnc=True, debug_log=True, heartbeat_us=10000)
    vm.debug_log_path.write_text("written before the upgrade\n")

    seen = await observe_upgrade(vm, network, fixtures.qemu_new, pings=PINGS)
    result = seen.action_result
    assert isinstance(result, UpgradeResult)
    # The TCP connection carried on: no reset, no lost, repeated or reordered record.
    assert seen.stream_faults == [], seen.stream_faults
    # A ping at 100/s lost at most a handful.
    assert seen.pings_sent == PINGS and seen.pings_lost <= 10, seen
    # The console and QMP paths kept accepting across switchover (the same sockets).
    assert set(seen.accept_gaps_ms) == {"qmp", "console"}
    assert all(gap < 50 for gap in seen.accept_gaps_ms.values()), seen.accept_gaps_ms
    # The VNC port is served by the new QEMU.
    reader, writer = await network.connect("127.0.0.1", vm.VNC_PORT)
    assert (await vnc_banner(reader)).startswith(b"RFB ")
    writer.close()
    # Echo works on a new connection, too.
    reader, writer = await network.connect(network.guest_ip, ECHO_PORT)
    writer.write(b"after the upgrade\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"after the upgrade\n"
    writer.close()
    # The new QEMU runs on the very same tap, and the -D log kept its old lines.
    assert qemu_pids(vm) == [result.destination_pid]
    assert tap_fds(result.destination_pid) == [network.tap]
    netdev = CommandLine.parse(result.destination_argv).by_id("netdev", "net0")
    assert netdev is not None and netdev.prop("fd") and netdev.prop("ifname") is None
    assert vm.debug_log_path.read_text().startswith("written before the upgrade\n")
    assert any(h.startswith("VNC") and "took over" in h for h in result.handed_over)
    await assert_guest_intact(vm)
    print(f"\nnetwork: {seen.pings_lost}/{seen.pings_sent} pings lost, longest TCP stall "
          f"{seen.longest_tcp_stall_ms:.0f} ms, re-accept gaps {seen.accept_gaps_ms}")


@pytest.mark.skipif(not Path("/dev/vhost-net").exists(),
                    reason="no /dev/vhost-net on this host (no vhost_net module): vhost-net is "
                           "tested at command-line level only (tests/test_handover.py)")
async def test_a_vhost_net_nic_gets_a_fresh_vhost_device_and_keeps_its_traffic(
        fixtures: FixturePaths, make_vm: VMFactory, network: TapNetwork):
    """Where the kernel has vhost-net: the new QEMU must get a vhost device of its own
    (the source's is bound to the source: VHOST_SET_OWNER answers EBUSY to another)."""
    vm = await make_vm(fixtures.qemu_old, guest=GuestKind.LINUX, ram_mib=512, network=network,
                       vhost=True, heartbeat_us=10000)
    source_vhost = {os.readlink(f"/proc/{vm.pid}/fd/{fd}") for fd in os.listdir(
        f"/proc/{vm.pid}/fd")} & {"/dev/vhost-net"}
    assert source_vhost, "the source QEMU did not open /dev/vhost-net"

    seen = await observe_upgrade(vm, network, fixtures.qemu_new, pings=PINGS)
    result = seen.action_result
    assert isinstance(result, UpgradeResult)
    assert seen.stream_faults == [], seen.stream_faults
    assert seen.pings_sent == PINGS and seen.pings_lost <= 10, seen
    netdev = CommandLine.parse(result.destination_argv).by_id("netdev", "net0")
    assert netdev is not None and netdev.prop("vhost") == "on" and netdev.prop("vhostfd")
    assert any("a fresh /dev/vhost-net" in h for h in result.handed_over)
    assert "/dev/vhost-net" in {os.readlink(f"/proc/{result.destination_pid}/fd/{fd}")
                                for fd in os.listdir(f"/proc/{result.destination_pid}/fd")}
    assert tap_fds(result.destination_pid) == [network.tap]
    await assert_guest_intact(vm)


async def test_a_tap_passed_by_fd_is_handed_over_twice(
        fixtures: FixturePaths, make_vm: VMFactory, network: TapNetwork):
    """The libvirt/Proxmox style: QEMU gets `-netdev tap,fd=N` from its manager."""
    vm = await make_vm(fixtures.qemu_old, network=network, tap="fd")
    assert tap_fds(vm.pid) == [network.tap]
    first = await engine.upgrade(vm.pid, fixtures.qemu_new)
    assert tap_fds(first.destination_pid) == [network.tap]
    second = await engine.upgrade(first.destination_pid, fixtures.qemu_new)
    assert tap_fds(second.destination_pid) == [network.tap]
    assert qemu_pids(vm) == [second.destination_pid]
    await assert_guest_intact(vm)


async def test_a_tap_qemu_created_outlives_the_old_qemu(
        fixtures: FixturePaths, make_vm: VMFactory, network: TapNetwork):
    """`-netdev tap,script=no` without ifname: QEMU creates a non-persistent tap,
    which exists only while a descriptor holds it."""
    vm = await make_vm(fixtures.qemu_old, network=network, tap="qemu")
    (created,) = tap_fds(vm.pid)
    assert created != network.tap
    result = await engine.upgrade(vm.pid, fixtures.qemu_new)
    assert tap_fds(result.destination_pid) == [created]
    links = subprocess.run(["ip", "-n", network.name, "-o", "link", "show", created],
                           capture_output=True, text=True)
    assert links.returncode == 0 and created in links.stdout  # still there, old QEMU gone
    assert qemu_pids(vm) == [result.destination_pid]
    await assert_guest_intact(vm)


@pytest.mark.parametrize(("queues", "versions", "mode"), [
    (2, "7.2->10.0", "shared"), (4, "10.0->11.1", "shared"), (4, "11.1->11.1", "cpr-exec")])
async def test_a_multiqueue_tap_keeps_tcp_and_pings(queues: int, versions: str, mode: str,
                                                    fixtures: FixturePaths, make_vm: VMFactory):
    """A guest using several queue pairs (one per vCPU): the new QEMU runs on fresh queues
    of the same multiqueue tap, so the queues the running guest uses are never detached
    under it (handing over the source's own queue fds made the starting QEMU detach them:
    10.0 then aborted with "could not disable queue"). cpr-exec keeps the source's own."""
    pick = {"7.2": fixtures.qemu_old, "10.0": fixtures.qemu_new, "11.1": fixtures.qemu_11}
    source, target = (pick[v] for v in versions.split("->"))
    memory = ({"backing": MemoryBacking.MEMFD, "aux_ram_share": True} if mode == "cpr-exec"
              else {"backing": MemoryBacking.FILE})
    with TapNetwork(multi_queue=True) as network:
        vm = await make_vm(source, guest=GuestKind.LINUX, ram_mib=512, network=network,
                           tap="mq", queues=queues, smp=queues, heartbeat_us=10000, **memory)
        assert network.attached_queues() == queues  # the guest's driver uses every pair
        report = await engine.plan(vm.pid, target, mode=mode)
        check = next(c for c in report.preflight.checks if c.name == "fd-handover")
        assert check.ok and f"multiqueue, {queues} queues" in check.detail, check.detail
        seen = await observe_upgrade(vm, network, target, pings=PINGS, mode=mode)
        result = seen.action_result
        assert isinstance(result, UpgradeResult) and result.mode == mode
        assert seen.stream_faults == [], seen.stream_faults
        assert seen.pings_sent == PINGS and seen.pings_lost <= 10, seen
        assert tap_fds(result.destination_pid) == [network.tap] * queues
        assert network.attached_queues() == queues  # the source's queues went with it
        assert qemu_pids(vm) == [result.destination_pid]
        await assert_guest_intact(vm)
        await vm.close()  # before the namespace goes


@pytest.mark.parametrize("queues", [1, 2])
async def test_the_network_survives_the_tool_killed_while_the_new_qemu_starts(
        queues: int, fixtures: FixturePaths, make_vm: VMFactory):
    """The tool SIGKILLed once the new QEMU runs (on the shared tap fd, or on fresh queues
    of a multiqueue tap): the keeper kills it, and puts back the tap's virtio-net header
    size, which the starting QEMU reset and only the dead engine's guard restored (found
    by this test: without it the guest was unreachable, "No route to host")."""
    with TapNetwork(multi_queue=queues > 1) as network:
        vm = await make_vm(fixtures.qemu_old, guest=GuestKind.LINUX, ram_mib=512,
                           network=network, tap="mq" if queues > 1 else "ifname",
                           queues=queues, smp=queues, heartbeat_us=10000)
        proc = await cli("upgrade", str(vm.pid), "--to", str(fixtures.qemu_new),
                         fault="destination-started:KILL")
        await proc.communicate()
        await settled()
        assert qemu_pids(vm) == [vm.pid]
        assert network.attached_queues() == queues
        assert tap_fds(vm.pid) == [network.tap] * queues
        reader, writer = await network.connect(network.guest_ip, ECHO_PORT)
        writer.write(b"after the rollback\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"after the rollback\n"
        writer.close()
        await assert_guest_intact(vm)
        await vm.close()  # before the namespace goes


async def test_plan_shows_what_is_handed_over_and_refuses_spice(
        fixtures: FixturePaths, make_vm: VMFactory, network: TapNetwork):
    vm = await make_vm(fixtures.qemu_old, network=network,
                       extra_args=["-spice", "port=5930,addr=127.0.0.1,disable-ticketing=on"])
    report = await engine.plan(vm.pid, fixtures.qemu_new)
    check = next(c for c in report.preflight.checks if c.name == "fd-handover")
    assert not check.ok and "SPICE cannot be handed over" in check.detail
    assert not check.forceable
    assert report.destination is not None
    assert any("tap netdev net0" in h for h in report.destination.handed_over)
    assert qemu_pids(vm) == [vm.pid]
