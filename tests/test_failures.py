"""Failures before switchover leave the guest on the source, exactly as it was;
bad input is refused with a clear message and changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from liveupgrade import engine, session
from liveupgrade.errors import (
    DestinationFailed,
    MonitorBusy,
    MonitorError,
    NotQemu,
    Refused,
    SourceNotFound,
    TargetBinaryError,
    TransferFailed,
    UsageError,
)
from rig import FixturePaths, FixtureVM, MemoryBacking
from tests.conftest import VMFactory
from tests.helpers import assert_guest_intact, leftovers, qemu_pids, runtime_dirs

pytestmark = pytest.mark.e2e


async def assert_untouched(vm: FixtureVM) -> None:
    """Only the source QEMU exists, it runs, and the guest never noticed."""
    assert qemu_pids(vm) == [vm.pid]
    async with vm.qmp() as q:
        assert (await q.execute("query-status"))["status"] == "running"
        caps = await q.execute("query-migrate-capabilities")
    enabled = {c["capability"] for c in caps if c["state"]} - {"events"}
    assert enabled == set(), enabled
    assert leftovers(vm) == []
    assert runtime_dirs() == []
    await vm.heartbeat.wait_beats(20, 10)
    assert vm.heartbeat.log.sequence_faults() == []


def wrapper(tmp_path: Path, real: Path, body: str) -> Path:
    script = tmp_path / "qemu-wrapper"
    script.write_text(f"#!/bin/sh\nREAL={real}\n{body}\n")
    script.chmod(0o755)
    return script


async def test_destination_that_dies_at_start_rolls_back(fixtures: FixturePaths,
                                                         make_vm: VMFactory, tmp_path: Path):
    broken = wrapper(tmp_path, fixtures.qemu_new,
                     'case "$*" in *incoming*) exec "$REAL" "$@" -device no-such-device ;; esac\n'
                     'exec "$REAL" "$@"')
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    with pytest.raises(DestinationFailed, match=r"no-such-device"):
        await engine.upgrade(vm.pid, broken)
    await assert_untouched(vm)


async def test_timeout_during_copy_cancels_and_source_runs_on(fixtures: FixturePaths,
                                                              make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, fill_mib=64)
    async with vm.qmp() as q:
        params_before = await q.execute("query-migrate-parameters")
    with pytest.raises(TransferFailed, match=r"did not reach switchover within 2 s"):
        await engine.upgrade(vm.pid, fixtures.qemu_new, mode="copy", bandwidth=1, timeout=2)
    await assert_untouched(vm)
    async with vm.qmp() as q:  # our bandwidth, downtime limit and channels were given back
        assert await q.execute("query-migrate-parameters") == params_before
    async with vm.qmp() as q:
        assert (await q.execute("query-migrate"))["status"] == "cancelled"
    # The source is as good as before: a real upgrade now succeeds.
    result = await engine.upgrade(vm.pid, fixtures.qemu_new, mode="copy")
    assert result.guest_running
    await assert_guest_intact(vm)


@pytest.mark.parametrize("moment", ["setup", "streaming"])
async def test_destination_killed_during_transfer_rolls_back(moment: str, fixtures: FixturePaths,
                                                             make_vm: VMFactory):
    """"setup": killed at the first progress report, mostly while the migration sets up
    its multifd channels, where a cancel could hang QEMU 10.0 for good (it did in 2 of
    80 runs before session.cancel_migration let setup end first); "streaming": while
    RAM flows."""
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, fill_mib=64)
    events: list[str] = []
    task = asyncio.ensure_future(engine.upgrade(
        vm.pid, fixtures.qemu_new, mode="copy", bandwidth=2,
        on_event=lambda e: events.append(e.message)))
    wanted = "migration " if moment == "setup" else "migration active"
    await vm.heartbeat.wait_for(lambda _log: any(m.startswith(wanted) for m in events), 30)
    destination = [p for p in vm.processes() if p.pid != vm.pid]
    assert len(destination) == 1
    destination[0].kill()
    with pytest.raises((DestinationFailed, TransferFailed)) as failure:
        await task
    assert "rollback did not complete" not in str(failure.value)  # the engine did it all
    await assert_untouched(vm)


async def test_sigterm_during_transfer_rolls_back(fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, fill_mib=64)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "liveupgrade", "upgrade", str(vm.pid), "--to",
        str(fixtures.qemu_new), "--mode", "copy", "--bandwidth", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await vm.heartbeat.wait_for(lambda _log: len(vm.processes()) == 2, 20)
    await asyncio.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"runs on the old QEMU" in err
    await assert_untouched(vm)


async def test_busy_monitor_is_refused(fixtures: FixturePaths, make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    async with vm.qmp():
        with pytest.raises(MonitorBusy, match=r"another client is connected"):
            await engine.upgrade(vm.pid, fixtures.qemu_new)
    await assert_untouched(vm)


async def test_unknown_and_non_qemu_sources(fixtures: FixturePaths, tmp_path: Path):
    with pytest.raises(SourceNotFound, match=r"no process with PID"):
        await engine.upgrade(2**22 + 12345, fixtures.qemu_new)
    with pytest.raises(NotQemu, match=r"not a QEMU system emulator"):
        await engine.upgrade(os.getpid(), fixtures.qemu_new)
    stale = tmp_path / "stale-qmp.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(SourceNotFound, match=r"no running QEMU with QMP socket"):
        await engine.upgrade(str(stale), fixtures.qemu_new)
    with pytest.raises(SourceNotFound, match=r"no running QEMU with -name"):
        await engine.upgrade("no-such-vm-name", fixtures.qemu_new)


async def test_bad_target_binaries(fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    with pytest.raises(TargetBinaryError, match=r"does not exist"):
        await engine.upgrade(vm.pid, tmp_path / "missing")
    not_exec = tmp_path / "qemu-not-executable"
    not_exec.write_bytes(Path(fixtures.qemu_new).read_bytes()[:64])
    with pytest.raises(TargetBinaryError, match=r"not executable"):
        await engine.upgrade(vm.pid, not_exec)
    script = wrapper(tmp_path, fixtures.qemu_new, "echo 'I am not QEMU' >&2; exit 1")
    with pytest.raises(TargetBinaryError,
                       match=r"not a QEMU system emulator \(it did not open a QMP monitor\): I am"):
        await engine.upgrade(vm.pid, script)
    with pytest.raises(TargetBinaryError, match=r"emulates i386"):
        await engine.upgrade(vm.pid, "/usr/bin/qemu-system-i386")
    await assert_untouched(vm)


async def test_machine_type_the_target_lacks_is_refused(fixtures: FixturePaths,
                                                        make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_new, machine="pc-i440fx-10.0", backing=MemoryBacking.FILE)
    with pytest.raises(Refused, match=r"does not support machine type pc-i440fx-10.0"):
        await engine.upgrade(vm.pid, fixtures.qemu_old)
    await assert_untouched(vm)


async def test_overrides_that_change_hardware_are_refused(fixtures: FixturePaths,
                                                          make_vm: VMFactory):
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    with pytest.raises(Refused, match=r"could change guest-visible hardware"):
        await engine.upgrade(vm.pid, fixtures.qemu_new, overrides=["pc.ram.size=512M"])
    with pytest.raises(Refused, match=r"nope.file: no -drive/-blockdev/-chardev with that id"):
        await engine.upgrade(vm.pid, fixtures.qemu_new, overrides=["nope.file=/x"])
    with pytest.raises(UsageError, match=r"is not ID.KEY=VALUE"):
        await engine.upgrade(vm.pid, fixtures.qemu_new, overrides=["garbage"])
    await assert_untouched(vm)


async def test_cli_reports_cause_fix_and_exit_code(fixtures: FixturePaths):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "liveupgrade", "upgrade", "999999999", "--to",
        str(fixtures.qemu_new), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 2 and out == b""
    assert b"error: no process with PID 999999999" in err and b"fix:" in err


async def test_a_target_that_dies_while_probed_is_an_error_not_a_traceback(
        fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    """A real QEMU killed while the probe talks to it (here: once its QMP socket exists)."""
    vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE)
    dying = wrapper(tmp_path, fixtures.qemu_new,
                    'for a in "$@"; do case "$a" in unix:*) sock=${a#unix:}; sock=${sock%%,*};; '
                    'esac; done\n'
                    '"$REAL" "$@" & pid=$!\n'
                    'while [ -n "$sock" ] && [ ! -S "$sock" ]; do sleep 0.005; done\n'
                    'sleep 0.03; kill -9 $pid; wait $pid')
    for attempt in range(3):  # the exact moment varies: each must end as a clean error
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "liveupgrade", "upgrade", str(vm.pid), "--to", str(dying),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode in (1, 2), (attempt, err)
        assert b"Traceback" not in err and b"liveupgrade: error: " in err, err
        assert b"died (killed by signal 9)" in err or b"exited" in err, err
    await assert_untouched(vm)


async def test_giving_the_source_back_outwaits_a_migration_winding_down(
        fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    """QEMU refuses new migration settings while a migration is under way or winding
    down. Giving the source back cancels, retries until QEMU takes the settings, and
    raises rather than leave them on. A migration that never stops (QEMU 10.0's
    multifd, cancelled while its channels set up, into a peer that never reads) is
    named, with the fix."""
    vm = await make_vm(fixtures.qemu_new, backing=MemoryBacking.ANONYMOUS, fill_mib=64)
    sink = socket.socket(socket.AF_UNIX)  # accepts in the kernel's backlog, never reads
    sink.bind(str(tmp_path / "sink"))
    sink.listen()

    async def migrate_into_the_sink(q: QMPClient, capability: str) -> None:
        await q.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": capability, "state": True}]})
        await q.execute("migrate", {"uri": f"unix:{tmp_path / 'sink'}"})

    async with vm.qmp() as q:
        await migrate_into_the_sink(q, "auto-converge")
        monkeypatch.setattr(session, "SETTLE_TIMEOUT", 0.3)
        with pytest.raises(MonitorError, match="in progress"):
            await session.reset_capabilities(q, ["auto-converge"], "source")
        await session.give_back(q, True, ["auto-converge"], {})
        caps = await q.execute("query-migrate-capabilities")
        assert (await q.execute("query-migrate"))["status"] == "cancelled"
        assert {c["capability"] for c in caps if c["state"]} <= {"events"}

        await migrate_into_the_sink(q, "multifd")
        monkeypatch.setattr(session, "SETUP_GRACE", 0.2)  # it hangs for good: shorter
        monkeypatch.setattr(session, "CANCEL_TIMEOUT", 1.0)  # waits tell the same
        with pytest.raises(MonitorError, match="stuck in 'cancelling'") as stuck:
            await session.give_back(q, True, ["multifd"], {})
        assert "restart the VM" in stuck.value.fix
        assert (await q.execute("query-status"))["running"]
    sink.close()
    await vm.heartbeat.wait_beats(20, 10)
