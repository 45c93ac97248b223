"""The upgrade survives the death of the tool itself (issue 11).

The CLI is run as a real process and killed (SIGKILL, SIGHUP, SIGTERM) at
each step the journal records (the test-only hook LIVEUPGRADE_TEST_FAULT
names the step) or at a random moment mid-transfer. Each case then checks
from outside, within the keeper's deadline: exactly one QEMU for the VM, in
the run state it had, the guest's heartbeat and memory intact, its QMP
socket and pidfile at their original paths answering, no run folder,
private socket, journal or keeper left, and a following upgrade succeeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from liveupgrade import engine
from liveupgrade.journal import POINT_OF_NO_RETURN, step_index
from rig import FixturePaths, FixtureVM, MemoryBacking
from rig.libvirt_vm import LibvirtFixtureVM
from tests.conftest import VMFactory
from tests.helpers import (
    assert_guest_intact,
    cli,
    exe_of,
    keepers,
    leftovers,
    runtime_dirs,
    settled,
    transaction_files,
)

pytestmark = pytest.mark.e2e

async def assert_one_qemu(vm: FixtureVM, binary: Path, running: bool = True) -> int:
    """Exactly one QEMU of this VM, the expected binary, in the run state it had, its QMP
    socket and pidfile at their original paths, nothing of the upgrade left over."""
    survivors = [p for p in vm.processes() if p.status() != psutil.STATUS_ZOMBIE]
    assert len(survivors) == 1, [p.cmdline() for p in survivors]
    pid = survivors[0].pid
    assert Path(exe_of(pid)).resolve() == _real_exe(binary), (exe_of(pid), binary)
    async with vm.qmp() as q:  # the original path
        assert (await q.execute("query-status"))["running"] is running
        assert (await q.execute("query-uuid"))["UUID"] == vm.uuid
        caps = await q.execute("query-migrate-capabilities")
        assert {c["capability"] for c in caps if c["state"]} - {"events"} == set()
    if vm.config.pidfile:
        assert vm.pidfile_path.read_text().strip() == str(pid)
    assert leftovers(vm) == [] and runtime_dirs() == [] and transaction_files() == []
    return pid


def exec_d(pid: int) -> bool:
    """Whether the process runs the image a cpr-exec started (it names the state file)."""
    return b"cpr-exec.state" in Path(f"/proc/{pid}/cmdline").read_bytes()


def _real_exe(binary: Path) -> Path:
    """The executable a wrapper script execs (the rig's QEMU 10.0 is a wrapper)."""
    text = binary.read_bytes()[:4096]
    if text.startswith(b"#!"):
        for line in text.decode().splitlines():
            if line.startswith("exec "):
                return Path(line.split()[1]).resolve()
    return binary.resolve()


@dataclass(frozen=True)
class Fault:
    mode: str  # shared, copy, cpr-transfer, cpr-exec
    signal: str  # KILL, HUP, TERM
    step: str | None  # a journal step; None: a random moment mid-transfer

    @property
    def rolls_forward(self) -> bool:
        if self.mode == "cpr-exec" and self.step == "exec":
            # A signal the engine handles arrives once `migrate` is its next move: it
            # carries on (the exec is its switchover); a killed engine never sent it.
            return self.signal != "KILL"
        return self.step is not None and step_index(self.step) >= step_index(POINT_OF_NO_RETURN)

    def __str__(self) -> str:
        return f"{self.mode}-{self.signal}-{self.step or 'mid-transfer'}"


STEPS = ["planning", "destination-starting", "destination-started", "migrating", "switchover",
         "resumed", "relocating"]
FAULTS = (
    [Fault("shared", "KILL", s) for s in STEPS]
    + [Fault("shared", "HUP", s) for s in STEPS]
    + [Fault("shared", "TERM", s) for s in ("destination-started", "migrating", "resumed")]
    + [Fault("copy", sig, None) for sig in ("KILL", "HUP")]
    + [Fault("copy", "KILL", s) for s in ("migrating", "switchover", "resumed")]
    + [Fault("cpr-transfer", "KILL", s) for s in ("destination-started", "migrating",
                                                   "switchover", "resumed")]
    + [Fault("cpr-transfer", "HUP", "migrating")]
    # cpr-exec: the rehearsal, the settings, `migrate` about to be sent, after the exec.
    + [Fault("cpr-exec", "KILL", s) for s in ("destination-started", "migrating", "exec",
                                               "switchover", "resumed")]
    + [Fault("cpr-exec", sig, "exec") for sig in ("HUP", "TERM")]
)


async def boot(make_vm: VMFactory, fixtures: FixturePaths, mode: str,
               **kwargs: object) -> tuple[FixtureVM, Path]:
    """A VM for the mode, and the binary to upgrade it to."""
    if mode == "shared":
        vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE, pidfile=True,
                           dirty_rate_mib=20, **kwargs)
    elif mode == "copy":
        vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, pidfile=True,
                           fill_mib=48, dirty_rate_mib=5, **kwargs)
    else:
        binary = fixtures.qemu_11 if mode == "cpr-exec" else fixtures.qemu_new
        vm = await make_vm(binary, backing=MemoryBacking.MEMFD, aux_ram_share=True,
                           pidfile=True, dirty_rate_mib=20, **kwargs)
    await vm.heartbeat.wait_for(lambda log: bool(log.last and log.last.passes >= 1), 30)
    return vm, fixtures.qemu_11 if mode == "cpr-exec" else fixtures.qemu_new


@pytest.mark.parametrize("fault", FAULTS, ids=str)
async def test_the_tool_dies(fault: Fault, fixtures: FixturePaths, make_vm: VMFactory):
    vm, target = await boot(make_vm, fixtures, fault.mode)
    old_binary = Path(vm.config.binary)
    args = ["upgrade", str(vm.pid), "--to", str(target), "--mode", fault.mode, "--json"]
    if fault.step is None:  # slow enough to be caught mid-transfer at a random moment
        args += ["--bandwidth", "4"]
    proc = await cli(*args, fault=f"{fault.step}:{fault.signal}" if fault.step else None)
    if fault.step is None:
        await vm.heartbeat.wait_for(lambda _log: len(vm.processes()) == 2, 20)
        await asyncio.sleep(random.uniform(0.3, 2.0))
        proc.send_signal(signal.Signals[f"SIG{fault.signal}"])
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    repaired_in = await settled()
    if fault.signal == "KILL":
        assert proc.returncode == -signal.SIGKILL
    elif fault.rolls_forward:  # the engine itself finished past the point of no return
        assert proc.returncode == 0 and json.loads(out)["ok"], err
    else:  # the engine itself rolled back
        assert proc.returncode == 1 and b"runs on the old QEMU" in out + err, (out, err)
    expected = target if fault.rolls_forward else old_binary
    pid = await assert_one_qemu(vm, expected)
    if fault.mode == "cpr-exec":  # one process throughout: which image runs is the question
        assert pid == vm.pid and exec_d(pid) is fault.rolls_forward
    else:
        assert (pid == vm.pid) is not fault.rolls_forward
    await assert_guest_intact(vm)
    # The VM is fit for the next upgrade.
    result = await engine.upgrade(pid, target, mode=fault.mode)
    assert result.guest_running
    await assert_one_qemu(vm, target)
    await assert_guest_intact(vm)
    print(f"\n{fault}: exit {proc.returncode}, repaired within {repaired_in * 1e3:.0f} ms, "
          f"runs on {'the new' if fault.rolls_forward else 'the old'} QEMU")


async def test_a_paused_vm_stays_paused_when_the_tool_dies_at_switchover(
        fixtures: FixturePaths, make_vm: VMFactory):
    vm, target = await boot(make_vm, fixtures, "shared")
    async with vm.qmp() as q:
        await q.execute("stop")
    proc = await cli("upgrade", str(vm.pid), "--to", str(target), fault="switchover:KILL")
    await proc.communicate()
    await settled()
    await assert_one_qemu(vm, target, running=False)
    async with vm.qmp() as q:
        await q.execute("cont")
    await assert_guest_intact(vm)


async def stopped_at(step: str, *args: str) -> asyncio.subprocess.Process:
    """The CLI, frozen (SIGSTOP) right after it recorded `step`: an upgrade in progress."""
    proc = await cli(*args, fault=f"{step}:STOP")
    deadline = time.monotonic() + 30
    while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
        assert proc.returncode is None and time.monotonic() < deadline
        await asyncio.sleep(0.02)
    return proc


@pytest.mark.parametrize(("mode", "step"), [("shared", "migrating"), ("shared", "resumed"),
                                            ("cpr-exec", "exec"), ("cpr-exec", "switchover")])
async def test_keeper_killed_too_then_recover(mode: str, step: str, fixtures: FixturePaths,
                                              make_vm: VMFactory):
    vm, target = await boot(make_vm, fixtures, mode)
    proc = await stopped_at(step, "upgrade", str(vm.pid), "--to", str(target), "--mode", mode)
    (keeper,) = keepers()
    psutil.Process(keeper).kill()
    proc.kill()
    await proc.communicate()
    await asyncio.sleep(0.2)
    assert keepers() == [] and any(f.endswith(".journal") for f in transaction_files())
    # list says what happened and what to run; upgrade refuses until it is repaired.
    listing = await cli("list", "--json")
    out, _ = await listing.communicate()
    notes = [v["upgrade"] for v in json.loads(out) if v["upgrade"]]
    assert notes and all(f"liveupgrade recover {vm.config.name}" in n for n in notes), notes
    refused = await cli("upgrade", vm.config.name, "--to", str(target))
    _, err = await refused.communicate()
    assert refused.returncode == 1 and b"was interrupted" in err
    assert f"liveupgrade recover {vm.config.name}".encode() in err
    # recover repairs it, in the direction the journal and the destination decide.
    repair = await cli("recover", vm.config.name, "--json")
    out, err = await repair.communicate()
    assert repair.returncode == 0, (out, err)
    (done,) = json.loads(out)
    forward = step in ("resumed", "switchover")
    assert done["action"] == ("rolled forward" if forward else "rolled back"), done
    pid = await assert_one_qemu(vm, target if forward else Path(vm.config.binary))
    assert done["pid"] == pid
    if mode == "cpr-exec":  # one process: the image tells which way it went
        assert pid == vm.pid and exec_d(pid) is forward
    await assert_guest_intact(vm)
    result = await engine.upgrade(pid, target)
    assert result.guest_running
    nothing = await cli("recover", "--all")
    out, _ = await nothing.communicate()
    assert nothing.returncode == 0 and b"no interrupted upgrades" in out


async def test_one_upgrade_per_vm_at_a_time(fixtures: FixturePaths, make_vm: VMFactory):
    vm, target = await boot(make_vm, fixtures, "shared")
    first = await stopped_at("migrating", "upgrade", str(vm.pid), "--to", str(target))
    destination = next(p.pid for p in vm.processes() if p.pid != vm.pid)
    for spec in (str(vm.pid), vm.config.name, str(vm.qmp_path)):
        second = await cli("upgrade", spec, "--to", str(target))
        _, err = await second.communicate()
        assert second.returncode == 1, err
        assert (f"an upgrade of VM {vm.config.name} is in progress (PID {first.pid})".encode()
                in err), err
    second = await cli("upgrade", str(destination), "--to", str(target))
    _, err = await second.communicate()
    assert second.returncode == 1 and b"is the new QEMU of an upgrade" in err, err
    listing = await cli("list", "--json")
    out, _ = await listing.communicate()
    rows = {v["pid"]: v for v in json.loads(out)}
    assert "in progress" in rows[vm.pid]["upgrade"]
    assert rows[destination]["upgrade"].startswith(f"new QEMU of VM {vm.config.name}")
    os.kill(first.pid, signal.SIGCONT)
    out, err = await asyncio.wait_for(first.communicate(), 60)
    assert first.returncode == 0, err
    await settled()
    await assert_one_qemu(vm, target)
    await assert_guest_intact(vm)


LIBVIRT_FAULTS = [("KILL", s) for s in ("libvirt-stopping", "destination-started", "migrating",
                                        "switchover", "resumed", "adopting")]
LIBVIRT_FAULTS += [("HUP", "migrating")]


@pytest.mark.parametrize(("sig", "step"), LIBVIRT_FAULTS, ids=lambda v: str(v))
async def test_the_tool_dies_on_the_libvirt_adopt_path(sig: str, step: str,
                                                       lvm: LibvirtFixtureVM,
                                                       libvirt_qemu_new: Path):
    import libvirt

    old_pid = lvm.pid
    proc = await cli("upgrade", str(old_pid), "--to", str(libvirt_qemu_new), "--libvirt-adopt",
                     fault=f"{step}:{sig}")
    await asyncio.wait_for(proc.communicate(), 90)
    await settled(60)  # a repair that restarts libvirtd waits for it to reconnect
    forward = step_index(step) >= step_index(POINT_OF_NO_RETURN)
    lvm.reconnect()  # the daemon runs again and reports the domain on the surviving QEMU
    assert lvm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    survivors = [p.pid for p in lvm.processes()]
    assert survivors == [lvm.pid]
    assert (lvm.pid == old_pid) is not forward
    assert runtime_dirs() == [] and transaction_files() == []
    await assert_guest_intact(lvm)  # type: ignore[arg-type]
    result = await engine.upgrade(lvm.pid, libvirt_qemu_new, libvirt_adopt=True)
    assert result.guest_running
    lvm.reconnect()
    assert lvm.pid == result.destination_pid


async def test_a_stalled_destination_is_rolled_back_at_the_timeout(
        fixtures: FixturePaths, make_vm: VMFactory):
    """A destination that stops reading (frozen by SIGSTOP before the source connects,
    as a QEMU hung on its storage would be) is killed at the timeout and the migration
    cancelled: the guest runs on the one old QEMU, without the upgrade's settings."""
    vm, target = await boot(make_vm, fixtures, "copy")
    proc = await stopped_at("migrating", "upgrade", str(vm.pid), "--to", str(target),
                            "--mode", "copy", "--timeout", "3")
    destination = next(p for p in vm.processes() if p.pid != vm.pid)
    destination.suspend()
    os.kill(proc.pid, signal.SIGCONT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and b"did not reach switchover within 3 s" in err, err
    assert b"rollback did not complete" not in err, err
    await settled()
    await assert_one_qemu(vm, Path(vm.config.binary))
    async with vm.qmp() as q:
        caps = await q.execute("query-migrate-capabilities")
        assert (await q.execute("query-migrate"))["status"] == "cancelled"
    assert {c["capability"] for c in caps if c["state"]} <= {"events"}
    await assert_guest_intact(vm)
