"""End-to-end upgrades of real guests under real QEMU, in every mode."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import pytest

from liveupgrade import engine
from liveupgrade.errors import Refused
from rig import FixturePaths, GuestKind, MemoryBacking
from tests.conftest import VMFactory
from tests.helpers import (
    assert_guest_intact,
    exe_of,
    is_running,
    leftovers,
    qemu_pids,
    runtime_dirs,
)

pytestmark = pytest.mark.e2e


async def _upgrade_and_check(vm, target, **kwargs):
    uuid_before = vm.uuid
    source_pid = vm.pid
    exe_of_source = exe_of(source_pid)
    runtime_before = runtime_dirs()
    started = time.monotonic()
    result = await engine.upgrade(vm.pid, target, **kwargs)
    finished = time.monotonic()
    await assert_guest_intact(vm)
    assert not is_running(source_pid)
    assert qemu_pids(vm) == [result.destination_pid]
    if result.source_version != result.target_version:
        assert exe_of(result.destination_pid) != exe_of_source
    async with vm.qmp() as q:  # the original socket path now reaches the new QEMU
        assert (await q.execute("query-uuid"))["UUID"] == uuid_before
        assert (await q.execute("query-name"))["name"] == vm.config.name
        assert (await q.execute("query-status"))["status"] == "running"
        version = await q.execute("query-version")
    assert result.uuid == uuid_before and result.guest_running
    assert version["qemu"]["major"] == int(result.target_version.split(".")[0])
    assert leftovers(vm) == []
    assert runtime_dirs() == runtime_before
    gap = vm.heartbeat.log.max_gap(started, finished)
    # QEMU's STOP -> RESUME is the vCPU pause; the guest's heartbeats cannot have
    # continued through it, so the host saw a gap at least that long (less one period).
    period_ms = vm.config.heartbeat_us / 1e3
    assert result.vcpu_pause_ms is not None
    assert 0 < result.vcpu_pause_ms <= gap.seconds * 1e3 + period_ms, (result.vcpu_pause_ms, gap)
    print(f"{result.mode} {result.source_version} -> {result.target_version}: pause "
          f"{gap.seconds * 1e3:.1f} ms, vCPUs stopped {result.vcpu_pause_ms:.1f} ms, "
          f"QEMU downtime {result.downtime_ms} ms, "
          f"RAM sent {result.ram_transferred_bytes} B, phases {result.phases_ms}")
    return result, version


@pytest.mark.parametrize("to", ["10.0", "7.2"])
async def test_shared_mode_from_7_2_microguest(fixtures: FixturePaths, make_vm: VMFactory, to):
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE, ram_mib=512, fill_mib=64,
                       dirty_rate_mib=50, heartbeat_us=1000)
    await vm.heartbeat.wait_for(lambda log: bool(log.last and log.last.passes >= 1), 20)
    target = fixtures.qemu_new if to == "10.0" else fixtures.qemu_old
    result, version = await _upgrade_and_check(vm, target)
    assert result.mode == "shared"
    assert f"{version['qemu']['major']}.{version['qemu']['minor']}" == to
    assert result.machine == "pc-i440fx-7.2"
    # Zero-copy: far less than the guest's 512 MiB crossed the socket.
    assert result.ram_transferred_bytes is not None
    assert result.ram_transferred_bytes < 16 * 1024 * 1024


async def test_shared_mode_q35_10_0_to_7_2_downgrade(fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, machine="pc-q35-7.2", backing=MemoryBacking.FILE,
                       fill_mib=32, dirty_rate_mib=20)
    result, version = await _upgrade_and_check(vm, fixtures.qemu_old, mode="shared")
    assert version["qemu"]["major"] == 7 and result.machine == "pc-q35-7.2"


async def test_cpr_transfer_10_0_to_10_0_memfd(fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.MEMFD, aux_ram_share=True,
                       ram_mib=512, fill_mib=64, dirty_rate_mib=50)
    result, _ = await _upgrade_and_check(vm, fixtures.qemu_new)
    assert result.mode == "cpr-transfer"
    assert result.ram_transferred_bytes is not None
    assert result.ram_transferred_bytes < 16 * 1024 * 1024


async def test_copy_mode_10_0_anonymous_ram_while_dirtying(fixtures: FixturePaths,
                                                           make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, ram_mib=512,
                       fill_mib=128, dirty_rate_mib=50)
    await vm.heartbeat.wait_for(lambda log: bool(log.last and log.last.passes >= 1), 30)
    result, _ = await _upgrade_and_check(vm, fixtures.qemu_new)
    assert result.mode == "copy"
    assert result.ram_transferred_bytes is not None
    assert result.ram_transferred_bytes > 128 * 1024 * 1024  # the filled pages were copied


async def test_copy_mode_from_7_2_under_tcg_is_refused(fixtures: FixturePaths, make_vm: VMFactory,
                                                       accel: str):
    if accel != "tcg":
        pytest.skip("the refusal is specific to TCG; under KVM copy mode from 7.2 is allowed")
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.ANONYMOUS)
    with pytest.raises(Refused, match=r"under TCG is unsafe.*--force tcg-dirty-bitmap"):
        await engine.upgrade(vm.pid, fixtures.qemu_new)
    with pytest.raises(Refused, match=r"copy mode is not possible: .*TCG"):
        await engine.upgrade(vm.pid, fixtures.qemu_new, mode="copy")
    assert qemu_pids(vm) == [vm.pid]


async def test_copy_mode_7_2_to_10_0_idle_guest_with_force(fixtures: FixturePaths,
                                                           make_vm: VMFactory):
    """The 7.2-source copy path itself, with the risk accepted by name.

    The guest's memory is idle (no re-dirtying; only its counters change):
    the TCG dirty-tracking bug corrupts guests that write memory during the
    copy, so this is the only 7.2 copy case that is meaningful to test.
    """
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.ANONYMOUS, fill_mib=32,
                       dirty_rate_mib=0)
    await vm.heartbeat.wait_for(lambda log: bool(log.last and log.last.passes >= 1), 20)
    result, version = await _upgrade_and_check(vm, fixtures.qemu_new, force=["tcg-dirty-bitmap"])
    assert result.mode == "copy" and version["qemu"]["major"] == 10
    assert result.ram_transferred_bytes is not None
    assert result.ram_transferred_bytes > 32 * 1024 * 1024


@pytest.mark.parametrize("to", ["10.0", "7.2"])
async def test_linuxguest_from_7_2_keeps_memory_and_disk(fixtures: FixturePaths,
                                                         make_vm: VMFactory, to):
    vm = await make_vm(fixtures.qemu_old, guest=GuestKind.LINUX, backing=MemoryBacking.FILE,
                       ram_mib=1024, fill_mib=64, dirty_rate_mib=20, heartbeat_us=10000)
    await vm.heartbeat.wait_for(
        lambda log: bool(log.last and log.last.passes >= 1 and (log.last.disk_seq or 0) >= 3), 90)
    disk_before = vm.heartbeat.log.last.disk_seq  # type: ignore[union-attr]
    result, _ = await _upgrade_and_check(
        vm, fixtures.qemu_new if to == "10.0" else fixtures.qemu_old)
    assert result.mode == "shared"
    await vm.heartbeat.wait_beats(100, 30)
    last = vm.heartbeat.log.last
    assert last is not None and last.disk_errors == 0
    assert last.disk_seq is not None and disk_before is not None and last.disk_seq > disk_before + 5


async def test_paused_vm_stays_paused(fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    async with vm.qmp() as q:
        await q.execute("stop")
    await asyncio.sleep(0.05)
    beats = len(vm.heartbeat.log.beats)
    result = await engine.upgrade(vm.pid, fixtures.qemu_new)
    assert not result.guest_running and result.vcpu_pause_ms is None  # it was paused anyway
    await asyncio.sleep(0.3)
    assert len(vm.heartbeat.log.beats) == beats  # nobody resumed it
    async with vm.qmp() as q:
        assert (await q.execute("query-status"))["status"] == "paused"
        await q.execute("cont")
    await assert_guest_intact(vm)


async def test_upgrade_twice_in_a_row(fixtures: FixturePaths, make_vm: VMFactory):
    """The destination's own command line must itself be upgradable (7.2 -> 10.0 -> 10.0)."""
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    first = await engine.upgrade(vm.pid, fixtures.qemu_new)
    second = await engine.upgrade(first.destination_pid, fixtures.qemu_new)
    assert second.mode == "shared" and second.uuid == first.uuid
    await assert_guest_intact(vm)
    assert qemu_pids(vm) == [second.destination_pid]
    argv = second.destination_argv
    assert argv.count("-incoming") == 1 and "liveupgrade-qmp" in " ".join(argv)
    assert " ".join(argv).count("id=liveupgrade-qmp") == 1


async def test_cli_json_by_qmp_path(fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "liveupgrade", "upgrade", str(vm.qmp_path),
        "--to", str(fixtures.qemu_new), "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out)  # exactly one JSON document
    assert doc["ok"] is True and doc["uuid"] == vm.uuid and doc["mode"] == "shared"
    assert set(doc["phases_ms"]) == {"inspect", "plan", "destination", "transfer",
                                     "switchover", "retire", "relocate"}
    await assert_guest_intact(vm)


async def test_upgrade_by_name(fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE,
                       name=f"lu-by-name-{os.getpid()}")
    result = await engine.upgrade(vm.config.name, fixtures.qemu_new)
    assert result.source_pid == vm.pid
    await assert_guest_intact(vm)


async def test_set_points_a_drive_at_an_identical_copy(fixtures: FixturePaths, make_vm: VMFactory,
                                                       tmp_path):
    image = tmp_path / "data.raw"
    image.write_bytes(os.urandom(1024 * 1024))
    copy = tmp_path / "data-copy.raw"
    copy.write_bytes(image.read_bytes())
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE, extra_args=[
        "-drive", f"file={image},if=none,id=data0,format=raw",
        "-device", "virtio-blk-pci,drive=data0,id=vdata0"])
    result = await engine.upgrade(vm.pid, fixtures.qemu_new, overrides=[f"data0.file={copy}"])
    assert f"file={copy},if=none,id=data0,format=raw" in result.destination_argv
    async with vm.qmp() as q:
        block = {b["device"]: b for b in await q.execute("query-block")}
    assert block["data0"]["inserted"]["file"] == str(copy)
    await assert_guest_intact(vm)
