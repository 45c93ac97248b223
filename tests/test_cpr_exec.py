"""cpr-exec (issue 12): the VM's own process execs the new QEMU and keeps its PID.

Real guests on QEMU 11.1 (the only QEMU >= 10.2 here, so 11.1 -> 11.1): the PID,
pidfile, UUID, memory and the network carry on; what a failed exec leaves; what
is refused before anything changes. The tool's own death at each step is in
tests/test_transaction.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from liveupgrade import engine
from liveupgrade.errors import DestinationFailed, Refused, SwitchoverFailed, TransferFailed
from liveupgrade.report import UpgradeEvent, UpgradeResult
from rig import FixturePaths, FixtureVM, GuestKind, MemoryBacking, TapNetwork
from rig.probes import observe_upgrade, vnc_banner
from tests.conftest import VMFactory
from tests.helpers import assert_guest_intact, qemu_pids, runtime_dirs
from tests.test_network import PINGS, tap_fds

pytestmark = pytest.mark.e2e

CPR_READY = {"backing": MemoryBacking.MEMFD, "aux_ram_share": True}


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def assert_same_vm(vm: FixtureVM, exec_d: bool) -> None:
    """One QEMU, the VM's own PID, its identity, and on which image it runs."""
    assert qemu_pids(vm) == [vm.pid]
    assert any("cpr-exec.state" in arg for arg in cmdline(vm.pid)) is exec_d
    async with vm.qmp() as q:  # the operator's QMP path, bound again by the new image
        assert (await q.execute("query-uuid"))["UUID"] == vm.uuid
        assert (await q.execute("query-status"))["running"]
        params = await q.execute("query-migrate-parameters")
        assert params["mode"] == "normal", params
    if vm.config.pidfile:
        assert vm.pidfile_path.read_text().strip() == str(vm.pid)
    assert runtime_dirs() == []
    await assert_guest_intact(vm)


async def test_the_vm_keeps_its_pid_pidfile_and_memory(fixtures: FixturePaths,
                                                       make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_11, pidfile=True, dirty_rate_mib=20, **CPR_READY)
    report = await engine.plan(vm.pid, fixtures.qemu_11, mode="cpr-exec")
    assert report.ok and report.exec_argv, report.render()
    assert "-daemonize" not in report.exec_argv
    assert "keeping its taps' fds" in report.render()
    for _ in range(2):  # and again, from the command line the first exec left
        result = await engine.upgrade(vm.pid, fixtures.qemu_11, mode="cpr-exec")
        assert result.mode == "cpr-exec" and result.destination_pid == vm.pid
        assert result.guest_running and result.vcpu_pause_ms is not None
        await assert_same_vm(vm, exec_d=True)


async def test_a_paused_vm_stays_paused(fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_11, dirty_rate_mib=20, **CPR_READY)
    async with vm.qmp() as q:
        await q.execute("stop")
    result = await engine.upgrade(vm.pid, fixtures.qemu_11, mode="cpr-exec")
    assert not result.guest_running and result.destination_pid == vm.pid
    async with vm.qmp() as q:
        assert (await q.execute("query-status"))["status"] == "paused"
        await q.execute("cont")
    await assert_same_vm(vm, exec_d=True)


async def test_a_daemonized_vm_keeps_its_pid(fixtures: FixturePaths, make_vm: VMFactory):
    """-daemonize, as Proxmox starts its VMs: kept in the exec'd command, the new QEMU would
    fork again (measured: the pidfile then named a new PID); the engine drops it."""
    vm = await make_vm(fixtures.qemu_11, daemonize=True, dirty_rate_mib=20, **CPR_READY)
    assert vm.pid != vm.process.pid  # type: ignore[union-attr]  # the forked daemon
    result = await engine.upgrade(vm.pid, fixtures.qemu_11, mode="cpr-exec")
    assert result.destination_pid == vm.pid
    assert "-daemonize" not in result.destination_argv
    await assert_same_vm(vm, exec_d=True)


async def test_a_tap_keeps_its_descriptor_tcp_and_pings(
        fixtures: FixturePaths, make_vm: VMFactory, network: TapNetwork):
    """The tap QEMU opened by ifname= survives the exec as fd=N: no reset, no lost record."""
    vm = await make_vm(fixtures.qemu_11, guest=GuestKind.LINUX, ram_mib=512, network=network,
                       heartbeat_us=10000, console_socket=True, vnc=True, **CPR_READY)
    seen = await observe_upgrade(vm, network, fixtures.qemu_11, pings=PINGS, mode="cpr-exec")
    result = seen.action_result
    assert isinstance(result, UpgradeResult) and result.destination_pid == vm.pid
    assert seen.stream_faults == [], seen.stream_faults
    assert seen.pings_sent == PINGS and seen.pings_lost <= 10, seen
    print(f"\ncpr-exec with a tap: {seen}")
    # The new image bound the QMP and console sockets and the VNC port again itself.
    assert set(seen.accept_gaps_ms) == {"qmp", "console"}
    assert all(gap < 200 for gap in seen.accept_gaps_ms.values()), seen.accept_gaps_ms
    reader, writer = await network.connect("127.0.0.1", vm.VNC_PORT)
    assert (await vnc_banner(reader)).startswith(b"RFB ")
    writer.close()
    assert tap_fds(vm.pid) == [network.tap]  # the same single tap descriptor, not a second
    await assert_same_vm(vm, exec_d=True)


async def test_a_failed_exec_leaves_the_guest_on_the_old_qemu(
        fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    """The target vanishes between the rehearsal and the exec: execvp fails, QEMU resumes
    the old image itself, and the engine gives back its settings."""
    vm = await make_vm(fixtures.qemu_11, pidfile=True, dirty_rate_mib=20, **CPR_READY)
    target = tmp_path / "qemu-new"
    target.write_bytes(fixtures.qemu_11.read_bytes())
    target.chmod(0o755)

    def remove_target(event: UpgradeEvent) -> None:
        if event.phase == "transfer":
            target.rename(tmp_path / "gone")

    with pytest.raises(TransferFailed, match="execvp"):
        await engine.upgrade(vm.pid, target, mode="cpr-exec", on_event=remove_target)
    await assert_same_vm(vm, exec_d=False)


async def test_the_rehearsal_catches_a_target_that_cannot_start_the_vm(
        fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    """A target whose probe looks fine but that refuses the VM's machine type when started
    (as a build without it would): the rehearsal fails, nothing was exec'd, the guest runs
    on as before. Without the rehearsal this VM would have been lost at the exec."""
    vm = await make_vm(fixtures.qemu_11, pidfile=True, dirty_rate_mib=20, **CPR_READY)
    target = tmp_path / "qemu-without-7.2-machines"
    refuse = ("case \"$*\" in *pc-i440fx-7.2*) echo \"qemu-system-x86_64: unsupported "
              "machine type 'pc-i440fx-7.2'\" >&2; exit 1;; esac")
    target.write_text(f"#!/bin/sh\n{refuse}\nexec {fixtures.qemu_11} \"$@\"\n")
    target.chmod(0o755)
    with pytest.raises(DestinationFailed, match="unsupported machine type"):
        await engine.upgrade(vm.pid, target, mode="cpr-exec")
    await assert_same_vm(vm, exec_d=False)


async def test_a_target_that_dies_loading_the_state_takes_the_vm_with_it(
        fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    """What cpr-exec cannot undo, shown rather than hidden: a target that passes the
    rehearsal but exits on the real load leaves no process to fall back to. The engine
    says so plainly; docs/design.md explains why auto never picks cpr-exec."""
    vm = await make_vm(fixtures.qemu_11, dirty_rate_mib=20, **CPR_READY)
    target = tmp_path / "qemu-crashes-on-load"
    target.write_text("#!/bin/sh\ncase \"$*\" in *cpr-exec.state*) echo 'simulated crash' >&2;"
                      f" exit 1;; esac\nexec {fixtures.qemu_11} \"$@\"\n")
    target.chmod(0o755)
    with pytest.raises(SwitchoverFailed, match="exited after the exec") as failed:
        await engine.upgrade(vm.pid, target, mode="cpr-exec")
    assert "start the VM again" in failed.value.fix
    assert vm.process is not None
    assert await asyncio.wait_for(vm.process.wait(), 10) == 1
    assert "simulated crash" in vm.qemu_log()
    assert qemu_pids(vm) == [] and runtime_dirs() == []


@pytest.mark.parametrize("case", ["sandbox", "10.0"])
async def test_refused_before_anything_changes(case: str, fixtures: FixturePaths,
                                               make_vm: VMFactory):
    if case == "sandbox":
        vm = await make_vm(fixtures.qemu_11, extra_args=["-sandbox", "on,spawn=deny"],
                           **CPR_READY)
        target, why = fixtures.qemu_11, "spawn=deny, which forbids the exec"
    else:
        vm = await make_vm(fixtures.qemu_new, **CPR_READY)
        target, why = fixtures.qemu_11, r"cpr-exec needs QEMU >= 10\.2 on both sides"
    with pytest.raises(Refused, match=why):
        await engine.upgrade(vm.pid, target, mode="cpr-exec")
    report = await engine.plan(vm.pid, target)
    assert report.transfer is not None and report.transfer.mode.value == "cpr-transfer", \
        "auto never picks cpr-exec"
    await assert_same_vm(vm, exec_d=False)
    assert os.path.exists(f"/proc/{vm.pid}")
