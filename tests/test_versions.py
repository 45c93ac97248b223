"""Today's QEMU (issue 12): 11.1 from trixie-backports against 7.2 and 10.0, both
directions where the machine type allows, on real guests. docs/compatibility.md has the
table these tests back."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveupgrade import engine
from liveupgrade.errors import Refused
from rig import FixturePaths, FixtureVM, MemoryBacking
from tests.conftest import VMFactory
from tests.helpers import assert_guest_intact, qemu_pids

pytestmark = pytest.mark.e2e


async def upgrade_and_check(vm: FixtureVM, target: Path, mode: str, version: str) -> None:
    """Upgrade in `mode`; the guest kept counting and verifying, on the wanted QEMU."""
    result = await engine.upgrade(vm.qmp_path, target)
    assert result.mode == mode, (result.mode, result.mode_reason)
    assert result.target_version.startswith(version) and result.guest_running
    assert qemu_pids(vm) == [result.destination_pid]
    async with vm.qmp() as q:
        assert (await q.execute("query-uuid"))["UUID"] == vm.uuid
        got = await q.execute("query-version")
    assert f"{got['qemu']['major']}.{got['qemu']['minor']}" == version
    await assert_guest_intact(vm)


async def test_shared_mode_between_7_2_10_0_and_11_1_both_ways(fixtures: FixturePaths,
                                                                make_vm: VMFactory):
    """One VM (pc-i440fx-7.2, RAM in a shared file) carried 7.2 -> 11.1 -> 10.0 -> 11.1 -> 7.2."""
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE, dirty_rate_mib=20)
    for target, version in ((fixtures.qemu_11, "11.1"), (fixtures.qemu_new, "10.0"),
                            (fixtures.qemu_11, "11.1"), (fixtures.qemu_old, "7.2")):
        await upgrade_and_check(vm, target, "shared", version)


async def test_cpr_transfer_10_0_to_11_1_and_11_1_to_11_1(fixtures: FixturePaths,
                                                           make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.MEMFD, aux_ram_share=True,
                       dirty_rate_mib=20)
    await upgrade_and_check(vm, fixtures.qemu_11, "cpr-transfer", "11.1")
    await upgrade_and_check(vm, fixtures.qemu_11, "cpr-transfer", "11.1")


async def test_a_downgrade_never_uses_cpr_transfer(fixtures: FixturePaths, make_vm: VMFactory):
    """11.1 -> 10.0 over cpr-transfer fails on the destination ('vmstate_load_state error
    -2'): auto takes copy instead, and asking for cpr-transfer is refused with the reason."""
    vm = await make_vm(fixtures.qemu_11, backing=MemoryBacking.MEMFD, aux_ram_share=True,
                       dirty_rate_mib=20)
    with pytest.raises(Refused, match="cpr-transfer to an older QEMU"):
        await engine.upgrade(vm.pid, fixtures.qemu_new, mode="cpr-transfer")
    await upgrade_and_check(vm, fixtures.qemu_new, "copy", "10.0")


async def test_copy_10_0_to_11_1_while_dirtying(fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, ram_mib=512,
                       fill_mib=128, dirty_rate_mib=50)
    await vm.heartbeat.wait_for(lambda log: bool(log.last and log.last.passes >= 1), 30)
    await upgrade_and_check(vm, fixtures.qemu_11, "copy", "11.1")


async def test_an_11_1_machine_type_cannot_go_back_to_10_0(fixtures: FixturePaths,
                                                           make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_11, backing=MemoryBacking.FILE, machine="pc-i440fx-11.1")
    with pytest.raises(Refused, match=r"does not support machine type pc-i440fx-11\.1"):
        await engine.upgrade(vm.pid, fixtures.qemu_new)
    assert qemu_pids(vm) == [vm.pid]
    await assert_guest_intact(vm)
