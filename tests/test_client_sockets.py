"""Client-mode chardev sockets across an upgrade (issue 13): what a daemon that the VM
connects to sees, e.g. Proxmox's qmeventd (a QMP client of `-chardev socket,...,reconnect`
+ `-mon mode=control`) or a console collector."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from liveupgrade import engine
from rig import FixturePaths, MemoryBacking
from tests.conftest import VMFactory
from tests.helpers import QMPEventListener, assert_guest_intact

pytestmark = pytest.mark.e2e


async def test_a_qmp_client_daemon_sees_the_new_qemu_connect_before_the_old_one_goes(
        fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    listener = QMPEventListener(tmp_path / "qmeventd.sock")
    await listener.start()
    try:
        vm = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE, extra_args=[
            "-chardev", f"socket,id=qmp-event,path={listener.path},reconnect=5",
            "-mon", "chardev=qmp-event,mode=control"])
        deadline = time.monotonic() + 10
        while not listener.connections:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # plan says what will happen to each socket the VM connects out on.
        report = await engine.plan(vm.pid, fixtures.qemu_new)
        assert report.destination is not None
        notes = report.destination.connects_out
        assert any(n.startswith(f"chardev qmp-event: QMP monitor (client) to {listener.path}")
                   for n in notes), notes
        assert any(n.startswith("chardev hb: socket (client)") for n in notes), notes
        assert "sockets the VM connects out on" in report.render()
        hb_connections = vm.heartbeat.connections
        result = await engine.upgrade(vm.pid, fixtures.qemu_new)
        await asyncio.sleep(0.5)
        await assert_guest_intact(vm)
    finally:
        await listener.close()
    old, new = listener.connections
    assert (old.pid, new.pid) == (vm.pid, result.destination_pid)
    # The new QEMU connected while the old one was still connected and running the guest:
    # the daemon is never without a connection to a live QEMU of the VM.
    assert new.opened < old.closed if old.closed else True
    assert old.closed is not None and new.closed is None
    old_events = [name for name, _ in old.events]
    new_events = [name for name, _ in new.events]
    # Of the run-state events a daemon acts on, the old QEMU says STOP (the migration's
    # last step) and then goes silent: no SHUTDOWN, POWERDOWN or RESET, which a daemon
    # would take for the guest powering off. The new one says RESUME. Both also report
    # the MIGRATION progress (events are per QEMU, sent on every monitor).
    run_state = {"STOP", "RESUME", "SHUTDOWN", "POWERDOWN", "RESET"}
    assert [e for e in old_events if e in run_state] == ["STOP"], old_events
    assert [e for e in new_events if e in run_state] == ["RESUME"], new_events
    assert "MIGRATION" in old_events and "MIGRATION" in new_events
    stop = next(t for name, t in old.events if name == "STOP")
    resume = next(t for name, t in new.events if name == "RESUME")
    assert stop < resume <= old.closed
    # The console collector (the rig's heartbeat server, a client-mode serial chardev) saw
    # the same: one more connection, and not one line lost or repeated.
    assert vm.heartbeat.connections == hb_connections + 1
    print(f"\nqmeventd stand-in: old QEMU PID {old.pid} events {old_events}, closed "
          f"{(old.closed - new.opened) * 1e3:.1f} ms after the new QEMU (PID {new.pid}) "
          f"connected; new QEMU events {new_events}; RESUME {(resume - stop) * 1e3:.1f} ms "
          f"after STOP")
