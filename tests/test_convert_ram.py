"""--convert-ram (issue 12): one copy onto shareable RAM, then every upgrade is zero-copy.

Real guests that dirty memory throughout; each upgrade is checked from outside
(heartbeat sequence, whole-memory verify passes) and by the next plan's mode.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupgrade import engine
from liveupgrade.cmdline import CommandLine
from liveupgrade.errors import Refused, TransferFailed, UsageError
from liveupgrade.memory import layout
from rig import FixturePaths, MemoryBacking
from tests.conftest import VMFactory
from tests.helpers import assert_guest_intact, qemu_pids, runtime_dirs

pytestmark = pytest.mark.e2e


@pytest.fixture
def ram_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="lu-ram-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def check(report: engine.PlanReport, name: str) -> str:
    (found,) = [c for c in report.preflight.checks if c.name == name]
    assert found.ok, report.render()
    return found.detail


async def test_anonymous_ram_onto_memfd_then_cpr_transfer(fixtures: FixturePaths,
                                                          make_vm: VMFactory):
    """The issue's path: anonymous 10.0 VM, dirtying -> 11.1 converted -> 11.1 zero-copy."""
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, fill_mib=64,
                       dirty_rate_mib=20)
    await vm.heartbeat.wait_for(lambda log: bool(log.last and log.last.passes >= 1), 30)
    report = await engine.plan(vm.pid, fixtures.qemu_11, convert_ram="")
    detail = check(report, "ram-conversion")
    assert "pc.ram (256 MiB)" in detail and "memfd" in detail and "cpr-transfer" in detail
    assert "extra host memory while copying: 256 MiB" in detail
    assert report.transfer is not None and report.transfer.mode.value == "copy"
    assert "mode: copy (--convert-ram: guest RAM pc.ram (256 MiB)" in report.render()

    first = await engine.upgrade(vm.pid, fixtures.qemu_11, convert_ram="")
    assert first.mode == "copy" and qemu_pids(vm) == [first.destination_pid]
    assert first.mode_reason.startswith("--convert-ram: guest RAM pc.ram")
    lay = layout(CommandLine.parse(first.destination_argv))
    assert lay.all_shared and lay.aux_ram_share, lay
    await assert_guest_intact(vm)

    second = await engine.upgrade(first.destination_pid, fixtures.qemu_11)
    assert second.mode == "cpr-transfer", second.mode_reason
    assert qemu_pids(vm) == [second.destination_pid]
    await assert_guest_intact(vm)


async def test_anonymous_ram_into_named_files_then_shared(fixtures: FixturePaths,
                                                          make_vm: VMFactory, ram_dir: Path):
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, dirty_rate_mib=20)
    first = await engine.upgrade(vm.pid, fixtures.qemu_new, convert_ram=str(ram_dir))
    assert first.mode == "copy"
    (ram_file,) = ram_dir.iterdir()
    assert ram_file.name == f"{vm.uuid}-pc.ram.ram" and ram_file.stat().st_size == 256 << 20
    await assert_guest_intact(vm)
    second = await engine.upgrade(first.destination_pid, fixtures.qemu_11, mode="auto")
    assert second.mode in ("cpr-transfer", "shared"), second.mode_reason
    third = await engine.upgrade(second.destination_pid, fixtures.qemu_new, mode="shared")
    assert third.mode == "shared" and qemu_pids(vm) == [third.destination_pid]
    await assert_guest_intact(vm)


async def test_a_failed_conversion_leaves_no_file_and_the_vm_as_it_was(
        fixtures: FixturePaths, make_vm: VMFactory, ram_dir: Path):
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, fill_mib=128,
                       dirty_rate_mib=20)
    with pytest.raises(TransferFailed, match="did not reach switchover"):
        await engine.upgrade(vm.pid, fixtures.qemu_new, convert_ram=str(ram_dir),
                             bandwidth=4, timeout=3)
    assert list(ram_dir.iterdir()) == [] and runtime_dirs() == []
    assert qemu_pids(vm) == [vm.pid]
    await assert_guest_intact(vm)


async def test_refused_when_there_is_nothing_to_convert_or_the_mode_cannot_copy(
        fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.FILE)
    with pytest.raises(Refused, match="already shareable: there is nothing to convert"):
        await engine.upgrade(vm.pid, fixtures.qemu_11, convert_ram="")
    with pytest.raises(UsageError, match="cannot go with --mode shared"):
        await engine.upgrade(vm.pid, fixtures.qemu_11, convert_ram="", mode="shared")
    assert qemu_pids(vm) == [vm.pid]
    await assert_guest_intact(vm)
