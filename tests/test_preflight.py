"""`list`, `plan` and the preflight checks, against real QEMU processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from liveupgrade import engine, inventory
from liveupgrade.errors import Refused, UsageError
from liveupgrade.fdpass import close_all, take_fds
from liveupgrade.target import clean_env
from rig import FixturePaths, MemoryBacking
from tests.conftest import VMFactory
from tests.helpers import assert_guest_intact, installed_copy, qemu_pids

pytestmark = pytest.mark.e2e


def checks(report: engine.PlanReport) -> dict[str, bool]:
    return {c.name: c.ok for c in report.preflight.checks}


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "liveupgrade", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_plan_passes_and_its_command_line_accepts_the_migration(
        fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    """`plan` changes nothing, and the destination it prints, started by hand, works."""
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    code, out, _ = await cli("plan", str(vm.pid), "--to", str(fixtures.qemu_new), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] and doc["mode"] == "shared"
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]
    assert {c["name"] for c in doc["checks"]} >= {
        "monitor", "migration-idle", "target-arch", "machine-type", "devices", "backends",
        "cpu-model", "rom-sizes", "mode", "paths", "bug:tcg-dirty-bitmap"}
    assert qemu_pids(vm) == [vm.pid]  # nothing was started
    # Start the planned destination by hand, as an operator would, and migrate into it.
    argv = doc["destination_argv"]
    for rel in doc["relocations"]:
        Path(rel["private"]).parent.mkdir(mode=0o700, exist_ok=True)
    engine_qmp = Path(next(a.split("path=")[1].split(",")[0] for a in argv
                           if a.startswith("socket,id=liveupgrade-qmp")))
    engine_qmp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The VM's QMP socket is handed over: fd=N names the source's descriptor,
    # which an operator duplicates and passes, as the engine does.
    assert doc["inherited_fds"] and any("-qmp" in h for h in doc["handed_over"])
    taken = take_fds(vm.pid, doc["inherited_fds"])
    argv = [re.sub(r"\bfd=(\d+)\b", lambda m: f"fd={taken[int(m.group(1))]}", a)
            for a in argv]
    # Connect to the source first, as the engine does: once the destination
    # runs, it serves the same QMP listening socket and may take new clients.
    async with vm.qmp() as src:
        dest = subprocess.Popen(argv, env=clean_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=list(taken.values()))
        close_all(taken.values())
        try:
            while not engine_qmp.exists():
                await asyncio.sleep(0.01)
            dst = QMPClient("by-hand")
            await dst.connect(str(engine_qmp))
            caps = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
            await dst.execute("migrate-set-capabilities", caps)
            mig = tmp_path / "m.sock"
            await dst.execute("migrate-incoming", {"uri": f"unix:{mig}"})
            await src.execute("migrate-set-capabilities", caps)
            await src.execute("migrate", {"uri": f"unix:{mig}"})
            while (await src.execute("query-migrate"))["status"] != "completed":  # type: ignore[index]
                await asyncio.sleep(0.01)
            while (await dst.execute("query-status"))["status"] != "paused":  # type: ignore[index]
                await asyncio.sleep(0.01)
            await dst.execute("cont")
            await vm.heartbeat.wait_beats(100, 10)
            assert vm.heartbeat.log.sequence_faults() == []
            await dst.disconnect()
        finally:
            dest.kill()
            dest.wait()
            shutil.rmtree(engine_qmp.parent, ignore_errors=True)


async def test_plan_reports_each_failing_check_with_its_fix(fixtures: FixturePaths,
                                                            make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, machine="pc-i440fx-10.0", backing=MemoryBacking.FILE,
                       extra_args=["-cpu", "EPYC-Genoa", "-device", "virtio-multitouch-pci"])
    report = await engine.plan(vm.pid, fixtures.qemu_old)
    got = checks(report)
    assert got["machine-type"] is False and got["cpu-model"] is False and got["devices"] is False
    failed = {c.name: c for c in report.preflight.failures}
    assert "virtio-multitouch-pci" in failed["devices"].detail
    assert "EPYC-Genoa" in failed["cpu-model"].detail
    assert failed["machine-type"].fix and not failed["machine-type"].forceable
    code, out, _ = await cli("plan", str(vm.pid), "--to", str(fixtures.qemu_old))
    assert code == 1
    assert "FAIL   machine-type" in out and "fix:" in out and "would be refused" in out
    with pytest.raises(Refused, match=r"machine-type.*(cpu-model|devices)"):
        await engine.upgrade(vm.pid, fixtures.qemu_old)
    assert qemu_pids(vm) == [vm.pid]


async def test_rom_size_mismatch_is_caught_before_migrating(fixtures: FixturePaths,
                                                             make_vm: VMFactory, tmp_path: Path):
    firmware = tmp_path / "firmware"
    firmware.mkdir()
    bios = Path("/usr/share/seabios/bios-256k.bin").read_bytes()
    (firmware / "bios-256k.bin").write_bytes(bios + bytes(256 * 1024))  # padded to 512 KiB
    wrapper = tmp_path / "qemu-other-firmware"
    wrapper.write_text(f"#!/bin/sh\nexec {fixtures.qemu_new} -L {firmware} \"$@\"\n")
    wrapper.chmod(0o755)
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    report = await engine.plan(vm.pid, wrapper)
    failed = {c.name: c for c in report.preflight.failures}
    assert set(failed) == {"rom-sizes"}
    assert "pc.bios: source 0x40000" in failed["rom-sizes"].detail and "0x80000" in \
        failed["rom-sizes"].detail
    with pytest.raises(Refused, match="rom-sizes"):
        await engine.upgrade(vm.pid, wrapper)
    assert qemu_pids(vm) == [vm.pid]
    await assert_guest_intact(vm)


async def test_host_memory_and_paths_checks_and_force(fixtures: FixturePaths, make_vm: VMFactory):
    # 64 GiB of guest RAM in a memfd (allocated lazily, not charged at start): without
    # aux-ram-share only a copy is possible, and a copy needs more than this host has.
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.MEMFD, ram_mib=64 * 1024)
    report = await engine.plan(vm.pid, fixtures.qemu_new)
    assert report.preflight.mode is not None and report.preflight.mode.value == "copy"
    assert checks(report)["host-memory"] is False
    forced = await engine.plan(vm.pid, fixtures.qemu_new, force=["host-memory"])
    assert forced.ok and [c.forced for c in forced.preflight.checks
                          if c.name == "host-memory"] == [True]
    with pytest.raises(UsageError, match="no such check"):
        await engine.plan(vm.pid, fixtures.qemu_new, force=["machine-type"])


async def test_paths_check_sees_overrides(fixtures: FixturePaths, make_vm: VMFactory,
                                          tmp_path: Path):
    image = tmp_path / "data.raw"
    image.write_bytes(bytes(1024 * 1024))
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE, extra_args=[
        "-drive", f"file={image},if=none,id=data0,format=raw"])
    assert checks(await engine.plan(vm.pid, fixtures.qemu_new))["paths"] is True
    report = await engine.plan(vm.pid, fixtures.qemu_new,
                               overrides=[f"data0.file={tmp_path}/missing.raw"])
    failed = {c.name: c for c in report.preflight.failures}
    assert "missing.raw" in failed["paths"].detail


async def test_list_marks_a_vm_stale_only_after_its_binary_is_replaced(
        fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    binary, wrapper = installed_copy(fixtures, tmp_path)
    vm = await make_vm(wrapper, backing=MemoryBacking.FILE)
    before = {v.pid: v for v in await inventory.list_vms()}[vm.pid]
    assert not before.stale and before.stale_reasons == []
    assert before.binary == str(binary) and before.version and before.version.startswith("7.2")
    assert before.uuid == vm.uuid and before.name == vm.config.name
    assert before.qmp == str(vm.qmp_path) and "shared" in before.modes
    # A package upgrade: the new file is written beside and renamed over the old one.
    fresh = binary.with_name("qemu-new")
    shutil.copy2(os.path.realpath(fixtures.qemu_old), fresh)
    fresh.replace(binary)
    after = {v.pid: v for v in await inventory.list_vms()}[vm.pid]
    assert after.stale and "was deleted or replaced" in after.stale_reasons[0]
    code, out, _ = await cli("list", "--json")
    assert code == 0 and any(v["pid"] == vm.pid and v["stale"] for v in json.loads(out))


async def test_upgrade_all_stale(fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    binary, wrapper = installed_copy(fixtures, tmp_path)
    stale = [await make_vm(wrapper, backing=MemoryBacking.FILE, name=f"stale-{i}")
             for i in range(2)]
    current = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE, name="current")
    unsafe = await make_vm(wrapper, backing=MemoryBacking.ANONYMOUS, name="stale-anon")
    binary.unlink()  # the package removed the old binary
    code, out, err = await cli("upgrade", "--all-stale", "--to", str(fixtures.qemu_new),
                               "--parallel", "2", "--json")
    doc = {d["name"]: d for d in json.loads(out)}
    assert code == 1, err  # one VM could not be upgraded
    assert set(doc) >= {"stale-0", "stale-1", "stale-anon"} and "current" not in doc
    assert doc["stale-0"]["ok"] and doc["stale-1"]["ok"], (doc["stale-0"], doc["stale-1"])
    assert not doc["stale-anon"]["ok"] and "TCG" in doc["stale-anon"]["error"]
    for vm in stale:
        await assert_guest_intact(vm)
        assert qemu_pids(vm) != [vm.pid]
    assert qemu_pids(current) == [current.pid] and qemu_pids(unsafe) == [unsafe.pid]
