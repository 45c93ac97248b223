"""Repair an upgrade whose engine died: roll it back or forward, from its journal.

Who decides what (docs/design.md has the table):

- the journal's last step is before ``switchover`` (journal.POINT_OF_NO_RETURN):
  the destination never ran the guest. Roll back: kill the destination (and
  anything naming its run folder), put the taps' virtio-net header size back
  (the starting destination resets it), then on the source cancel the migration,
  resume the guest if it ran, give back capabilities and parameters; remove
  the private paths; start the libvirt daemon again on the untouched status.
- the last step is ``switchover`` (the engine was resuming the destination):
  ask the destination itself over its private monitor. If it holds the whole
  VM state (its run state is no longer ``inmigrate``), roll forward; if it
  is dead or never got the state, roll back as above.
- the last step is ``resumed`` or later: the guest ran on the destination, so
  the source's state is stale. Roll forward: kill the source, move sockets
  and pidfile into place, rebind VNC, adopt into libvirt.
- cpr-exec from ``exec`` on: there is one process. If it runs the new image
  (its command line names the state file), wait for it to run the guest; if
  the old image's migration failed, roll back as above (QEMU resumed it).

Killing always comes before resuming, so two copies never run. Each action
is idempotent: a repair that is itself killed can run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from liveupgrade import cprexec, fdpass, libvirt_domain, monitor, procs
from liveupgrade.destination import kill_strays
from liveupgrade.errors import LiveUpgradeError, MonitorBusy, SourceNotFound
from liveupgrade.journal import POINT_OF_NO_RETURN, Journal, VMLock, holder, journals
from liveupgrade.plan import Relocation
from liveupgrade.session import give_back, migration_status, reset_on_new_qemu
from liveupgrade.switchover import move_into_place, rebind_vnc, retire_source

MONITOR_TIMEOUT = 2.0


@dataclass
class Repair:
    """What a repair found and did to one VM."""

    vm: str
    key: str
    step: str
    action: str = "nothing"  # rolled back/forward, nothing to undo/left, in progress, failed
    pid: int | None = None  # the QEMU the VM runs on afterwards
    running: bool | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def summary(self) -> str:
        head = (f"{self.vm}: interrupted at '{self.step}': {self.action}"
                + (f"; runs on PID {self.pid}" if self.pid else ""))
        lines = [head] + [f"  {note}" for note in self.notes]
        if self.error:
            lines.append(f"  error: {self.error}" + (f"\n  fix: {self.fix}" if self.fix else ""))
        return "\n".join(lines)


async def repair(journal: Journal) -> Repair:
    """Roll `journal`'s upgrade back or forward; the caller holds the VM's lock."""
    result = Repair(journal.label, journal.key, journal.step)
    if journal.step == "planning":  # nothing had changed: only the run folder to remove
        _remove_private_paths(journal)
        result.action, result.pid = "nothing to undo", journal.facts["source"]["pid"]
        result.notes.append("the upgrade had not changed anything yet")
        return result
    src, dst = journal.facts["source"], journal.facts.get("destination") or {}
    if not procs.alive(src["pid"], src.get("create_time")) and \
            not procs.alive(dst.get("pid"), dst.get("create_time")):
        # e.g. the host rebooted: nothing of this upgrade runs, so nothing can be repaired,
        # and a VM started again with the same UUID must not stay blocked by this record.
        _remove_private_paths(journal)
        result.action = "nothing left"
        result.notes.append(f"neither the old QEMU (PID {src['pid']}) nor the new one "
                            f"(PID {dst.get('pid', '-')}) of this upgrade runs any more; "
                            "the record is closed")
        return result
    try:
        if journal.facts.get("mode") == "cpr-exec" and journal.reached("exec"):
            await _repair_in_place(journal, result)
        elif await _forward(journal, result):
            await _roll_forward(journal, result)
        else:
            await _roll_back(journal, result)
    except LiveUpgradeError as e:
        result.action, result.error, result.fix = "failed", str(e), e.fix
    except Exception as e:  # a repair must report, whatever QEMU or the host did
        result.action, result.error = "failed", f"{type(e).__name__}: {e}"
        result.fix = "inspect the VM's processes; run `liveupgrade recover` again"
    return result


async def _forward(journal: Journal, result: Repair) -> bool:
    """Whether the destination has (or may have) run the guest: decided from facts."""
    if not journal.reached(POINT_OF_NO_RETURN):
        return False
    dst = journal.facts.get("destination") or {}
    if journal.reached("resumed"):
        return True
    if not procs.alive(dst.get("pid"), dst.get("create_time")):
        result.notes.append("the destination had not resumed the guest and is gone")
        return False
    status = await _run_state(Path(dst["qmp_path"]))
    result.notes.append(f"the destination's own run state: {status or 'unreachable'}")
    return status is not None and status != "inmigrate"


async def _run_state(qmp_path: Path) -> str | None:
    with contextlib.suppress(LiveUpgradeError, TimeoutError, OSError):
        async with asyncio.timeout(MONITOR_TIMEOUT * 2):
            client = await monitor.connect(qmp_path, "liveupgrade-recover", MONITOR_TIMEOUT)
            try:
                state = await monitor.execute(client, "query-status")
                return str(state["status"])
            finally:
                await client.disconnect()
    return None


def _relocations(journal: Journal) -> list[Relocation]:
    return [Relocation(Path(r["private"]), Path(r["original"]), r["kind"])
            for r in journal.facts.get("relocations", [])]


def _remove_private_paths(journal: Journal) -> None:
    """What the destination would have used: its private folders, its run folder, and
    the RAM files a --convert-ram upgrade had it create (the VM stays on its own RAM)."""
    for rel in _relocations(journal):
        shutil.rmtree(rel.private.parent, ignore_errors=True)
    for name in journal.facts.get("ram_files", []):
        Path(name).unlink(missing_ok=True)
    if journal.facts.get("rundir"):
        shutil.rmtree(journal.facts["rundir"], ignore_errors=True)


def _libvirt(journal: Journal) -> libvirt_domain.LibvirtPause | None:
    data = journal.facts.get("libvirt")
    return libvirt_domain.LibvirtPause.from_json(data) if data else None


async def _source_monitor(journal: Journal) -> monitor.Monitor:
    """The source's monitor: its QMP socket, or through libvirt while libvirt holds it."""
    src = journal.facts["source"]
    try:
        return await monitor.connect(Path(src["qmp_path"]), "liveupgrade-recover",
                                     MONITOR_TIMEOUT)
    except MonitorBusy:
        pause = _libvirt(journal)
        if pause is None or libvirt_domain.Daemon.find() is None:
            raise
        return await asyncio.to_thread(libvirt_domain.LibvirtMonitor, pause.vm)


async def _roll_back(journal: Journal, result: Repair) -> None:
    facts, src = journal.facts, journal.facts["source"]
    dst = facts.get("destination") or {}
    if facts.get("rundir"):
        killed = await asyncio.to_thread(kill_strays, facts["rundir"], dst.get("pid"),
                                         dst.get("create_time"))
        if killed:
            result.notes.append(f"killed the destination QEMU (PID {', '.join(map(str, killed))})")
    result.action = "rolled back"
    if not procs.alive(src["pid"], src.get("create_time")):
        _remove_private_paths(journal)
        raise LiveUpgradeError(f"the old QEMU (PID {src['pid']}) is gone too: the VM does not "
                               "run anywhere", "start the VM again from its definition")
    headers = {int(fd): size for fd, size in facts.get("vnet_header_sizes", {}).items()}
    if headers:
        try:
            result.notes += await asyncio.to_thread(fdpass.restore_vnet_header_sizes,
                                                    src["pid"], headers)
        except (OSError, LiveUpgradeError) as e:  # the guest runs on; its NIC may not
            result.notes.append(f"could not check the taps' virtio-net header size: {e}")
    client = await _source_monitor(journal)
    try:
        result.notes += await give_back(client, bool(src["running"]), facts.get("source_caps", []),
                                        facts.get("params_before", {}))
        state: Any = await client.execute("query-status")
        result.running = bool(state["running"])
    finally:
        await client.disconnect()
    result.pid = src["pid"]
    _remove_private_paths(journal)
    pause = _libvirt(journal)
    if pause is not None and journal.reached("libvirt-stopping"):
        await pause.give_back(src["pid"], bool(src["running"]))
        result.notes.append(f"{pause.daemon.name} running again; libvirt reports the VM on "
                            f"PID {src['pid']}")


async def _roll_forward(journal: Journal, result: Repair) -> None:
    facts, src, dst = journal.facts, journal.facts["source"], journal.facts["destination"]
    result.action = "rolled forward"
    if not procs.alive(dst["pid"], dst.get("create_time")):
        raise LiveUpgradeError(
            f"the new QEMU (PID {dst['pid']}) ran the guest and is gone: the VM is not running; "
            f"the old QEMU (PID {src['pid']}) holds the state from before switchover and "
            "was left as it is", "start the VM again from its definition")
    client = await monitor.connect(Path(dst["qmp_path"]), "liveupgrade-recover",
                                   MONITOR_TIMEOUT)
    try:
        state: Any = await client.execute("query-status")
        if src["running"] and not state["running"]:
            await monitor.execute(client, "cont", what="destination")
            result.notes.append("resumed the guest on the new QEMU")
        if await retire_source(src["pid"], src.get("create_time")):
            result.notes.append(f"the old QEMU (PID {src['pid']}) is gone")
        moved, failed = move_into_place(_relocations(journal), None)
        result.notes += [f"moved into place: {m}" for m in moved]
        vnc = facts.get("vnc")
        if vnc and not journal.reached("adopting"):
            result.notes.append(await rebind_vnc(client, vnc["display"], vnc["address"]))
        result.notes += await reset_on_new_qemu(client, facts.get("target_caps", []))
        state = await client.execute("query-status")
        result.running = bool(state["running"])
    finally:
        await client.disconnect()
    result.pid = dst["pid"]
    if failed:
        result.error = "these paths could not be moved into place: " + "; ".join(failed)
        result.fix = "move them by hand; the new QEMU listens on the private paths"
    if facts.get("rundir"):
        shutil.rmtree(facts["rundir"], ignore_errors=True)
    pause = _libvirt(journal)
    if pause is not None:
        result.notes += await pause.adopt(dst["pid"], facts["target_binary"], bool(src["running"]))


async def _repair_in_place(journal: Journal, result: Repair) -> None:
    """cpr-exec after `migrate` was sent: one process, the old image or the new one.

    The new image's command line names the state file. While it does not, the
    source's migration status decides: failed or cancelled means QEMU resumed
    the old image (roll back as usual); completed means the exec is under way.
    """
    facts, src = journal.facts, journal.facts["source"]
    pid, created = src["pid"], src.get("create_time")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cprexec.EXEC_TIMEOUT
    while not cprexec.has_exec_d(pid, facts["state_file"]):
        status = await _migration_status(journal)
        if status in ("failed", "cancelled", "none") or loop.time() > deadline:
            await _roll_back(journal, result)
            return
        await asyncio.sleep(0.01)
    result.action, result.pid = "rolled forward", pid
    result.notes.append(f"the VM's process (PID {pid}) had exec'd the new QEMU")
    client = await cprexec.reconnect(pid, created, Path(facts["exec_qmp"]),
                                     bool(src["running"]))
    try:
        state: Any = await client.execute("query-status")
        result.running = bool(state["running"])
    finally:
        await client.disconnect()
    if facts.get("rundir"):
        shutil.rmtree(facts["rundir"], ignore_errors=True)


async def _migration_status(journal: Journal) -> str:
    """The old image's migration status, or "completed" once its monitor is gone."""
    try:
        client = await _source_monitor(journal)
    except LiveUpgradeError:
        return "completed"
    try:
        return await migration_status(client)
    except Exception:
        return "completed"
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def _matches(journal: Journal, spec: str) -> bool:
    facts = journal.facts
    pids = {str(facts["source"]["pid"]), str((facts.get("destination") or {}).get("pid"))}
    names = {journal.key, str(facts.get("vm")), str(facts.get("uuid")),
             str(facts["source"].get("qmp_path"))}
    return spec in pids or spec in names


async def recover(vm: str | None = None) -> list[Repair]:
    """`liveupgrade recover [VM]`: repair every interrupted upgrade (of VM: a name, UUID or
    PID of either QEMU). An upgrade that is still running (its lock is held) is left alone
    and reported as in progress."""
    found = [j for j in journals() if vm is None or _matches(j, vm)]
    if vm is not None and not found:
        raise SourceNotFound(f"no interrupted upgrade of {vm} on this host",
                             "`liveupgrade list` shows interrupted upgrades; "
                             "`liveupgrade recover` alone repairs all of them")
    repairs = []
    for journal in found:
        lock = VMLock.try_acquire(journal.key)
        if lock is None:
            repairs.append(Repair(journal.label, journal.key, journal.step, "in progress",
                                  notes=[f"left alone: its upgrade still runs "
                                         f"({holder(journal.key)})"]))
            continue
        try:
            repairs.append(await _repair_and_close(journal))
        finally:
            lock.release()
    return repairs


async def _repair_and_close(journal: Journal) -> Repair:
    """Repair; the journal goes only once the VM runs on exactly one QEMU again."""
    result = await repair(journal)
    if result.ok:
        journal.remove()
    return result


async def repair_by_keeper(journal_path: Path, lock_fd: int) -> int:
    """The keeper's repair after the engine died (keeper.py); logs to recovery.log."""
    key = journal_path.name.removesuffix(".journal")
    lock = VMLock(key, lock_fd, journal_path.with_name(f"{key}.lock"))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        if not journal_path.exists():
            return 0  # the engine died before it changed anything
        journal = Journal.load(journal_path)
        print(f"{stamp} keeper: the upgrade of {journal.label} died at step "
              f"'{journal.step}'; repairing", flush=True)
        result = await _repair_and_close(journal)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} keeper: {result.summary()}", flush=True)
        return 0 if result.ok else 1
    except Exception:
        print(f"{stamp} keeper: repair of {key} failed:\n{traceback.format_exc()}", flush=True)
        return 1
    finally:
        lock.release()
