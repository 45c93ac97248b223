"""The rig's own tests: guests boot and heartbeat on both QEMUs, the gap
meter is accurate, and the memory checker really catches corruption."""

from __future__ import annotations

import asyncio
import time

import pytest

from rig import FixturePaths, GuestKind, MemoryBacking
from tests.conftest import VMFactory

pytestmark = pytest.mark.e2e

PATTERN_BASE = 16 * 1024 * 1024  # microguest/main.c: PATTERN_BASE
PAGE = 4096


def qemu(fixtures: FixturePaths, which: str):
    return fixtures.qemu_old if which == "7.2" else fixtures.qemu_new


@pytest.mark.parametrize("which", ["7.2", "10.0"])
@pytest.mark.parametrize("machine", ["pc-i440fx-7.2", "pc-q35-7.2"])
@pytest.mark.parametrize("backing", list(MemoryBacking))
async def test_microguest_boots_and_verifies(fixtures, make_vm: VMFactory, which, machine, backing):
    vm = await make_vm(qemu(fixtures, which), machine=machine, backing=backing,
                       fill_mib=16, dirty_rate_mib=20)
    assert vm.boot_seconds is not None and vm.boot_seconds < 1.0, vm.boot_seconds
    await vm.heartbeat.wait_for(lambda log: log.last is not None and log.last.passes >= 2, 20)
    log = vm.heartbeat.log
    assert log.sequence_faults() == []
    assert log.last is not None and log.last.errors == 0 and log.last.dirtied > 0
    assert log.boots and log.boots[0].startswith("BOOT 10 14 7d0")  # fill, rate, hb in hex
    async with vm.qmp() as q:
        assert (await q.execute("query-status"))["status"] == "running"
        assert (await q.execute("query-uuid"))["UUID"] == vm.uuid
    print(f"microguest {which} {machine} {backing.value}: "
          f"first heartbeat {vm.boot_seconds * 1e3:.0f} ms")


@pytest.mark.parametrize(("which", "machine"), [("7.2", "pc-i440fx-7.2"), ("10.0", "pc-q35-7.2")])
async def test_linuxguest_boots_verifies_and_writes_disk(fixtures, make_vm: VMFactory, which,
                                                         machine):
    vm = await make_vm(qemu(fixtures, which), guest=GuestKind.LINUX, machine=machine,
                       ram_mib=512, fill_mib=32, dirty_rate_mib=5, heartbeat_us=10000)
    await vm.heartbeat.wait_for(
        lambda log: bool(log.last and log.last.passes >= 1 and (log.last.disk_seq or 0) >= 5), 60)
    log = vm.heartbeat.log
    last = log.last
    assert last is not None
    assert log.sequence_faults() == []
    assert last.errors == 0 and last.disk_errors == 0
    print(f"linuxguest {which} {machine}: first heartbeat {vm.boot_seconds:.2f} s")


async def test_stop_cont_100ms_is_measured_as_100ms(fixtures, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_old, heartbeat_us=1000)
    await vm.heartbeat.wait_beats(200, 10)
    async with vm.qmp() as q:
        start = time.monotonic()
        await q.execute("stop")
        await asyncio.sleep(0.100)
        await q.execute("cont")
        end = time.monotonic()
    await vm.heartbeat.wait_beats(50, 10)
    gap = vm.heartbeat.log.max_gap(start - 0.05, end)
    print(f"stop/cont of 100 ms measured as {gap.seconds * 1e3:.1f} ms")
    assert 0.085 <= gap.seconds <= 0.115
    assert vm.heartbeat.log.sequence_faults() == []


async def test_idle_heartbeat_noise_floor(fixtures, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_old, heartbeat_us=1000)
    await vm.heartbeat.wait_beats(50, 10)
    start = time.monotonic()
    await asyncio.sleep(2.0)
    gap = vm.heartbeat.log.max_gap(start, time.monotonic())
    print("idle heartbeat noise floor (largest gap over 2 s, 1 ms period): "
          f"{gap.seconds * 1e3:.2f} ms")
    assert gap.seconds < 0.050


async def test_host_corruption_is_reported_within_one_verify_pass(fixtures, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE, fill_mib=16)
    await vm.heartbeat.wait_for(lambda log: log.last is not None and log.last.passes >= 1, 20)
    page, word = 1234, 77
    last = vm.heartbeat.log.last
    assert last is not None and last.errors == 0
    with vm.ram_file.open("r+b") as ram:
        ram.seek(PATTERN_BASE + page * PAGE + word * 4)
        ram.write(b"\xde\xad\xbe\xef")
    passes_at_injection = last.passes
    # The pass under way may already be past the page; the next whole pass is not.
    await vm.heartbeat.wait_for(
        lambda log: log.last is not None and log.last.passes >= passes_at_injection + 2, 20)
    log = vm.heartbeat.log
    assert log.last is not None and log.last.errors == 1
    assert log.error_lines and log.error_lines[0].split()[1:3] == [f"{page:x}", f"{word:x}"]
