"""The source QEMU during an upgrade: the engine's monitor on it, and what to give back.

Until switchover the source is authoritative. Everything the engine changes
on it (migration capabilities and parameters, a migration that stops its
vCPUs at the end) is given back by `give_back`, which the engine's undo and
a repair after the engine's death (recovery.py) both call, from what the
engine noted or what the journal recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from qemu.qmp import ExecuteError
from qemu.qmp.events import EventListener

from liveupgrade import monitor
from liveupgrade.destination import event_time, set_migration
from liveupgrade.errors import MonitorError
from liveupgrade.source import ACTIVE_MIGRATION, SourceProcess, SourceState

CANCEL_TIMEOUT = 5.0
SETUP_GRACE = 2.0  # how long a migration setting up may take before it is cancelled
SETTLE_TIMEOUT = 10.0  # how long a failed migration may keep QEMU from taking settings


async def migration_status(client: monitor.Monitor) -> str:
    """The migration's status as QEMU reports it ("none" before any)."""
    info: Any = await client.execute("query-migrate")
    return str(info.get("status", "none"))


async def cancel_migration(client: monitor.Monitor) -> str:
    """Cancel a migration that is still under way; return the final migration status.

    A migration still in `setup` is first given SETUP_GRACE to leave it: QEMU 10.0
    and 11.1 with multifd can hang for good when cancelled while their channels set
    up (measured: the migration thread waits in multifd_send_sync_main for a channel
    that is gone, and the status stays `cancelling`; 2 of 80 destinations killed at
    the first progress report, none of 160 with the grace), so a cancel goes to a
    migration that streams, or one that failed by itself, not to one setting up.
    """
    loop = asyncio.get_running_loop()
    status = await migration_status(client)
    grace = loop.time() + SETUP_GRACE
    while status == "setup" and loop.time() < grace:
        await asyncio.sleep(0.01)
        status = await migration_status(client)
    if status not in ACTIVE_MIGRATION:
        return status
    with contextlib.suppress(Exception):
        await client.execute("migrate_cancel")
    deadline = loop.time() + CANCEL_TIMEOUT
    while status in ACTIVE_MIGRATION and loop.time() < deadline:
        await asyncio.sleep(0.01)
        status = await migration_status(client)
    return status


async def _set_once_accepted(client: monitor.Monitor, caps: dict[str, bool],
                             params: dict[str, Any], side: str) -> None:
    """Set migration settings, retrying while QEMU refuses them: right after a migration
    failed or was cancelled (the destination killed, say) QEMU still cleans it up for a
    moment and answers "There's a migration process in progress" (not seen on this
    host, where a cancelled migration settles within 0.1 s). A refusal that outlasts
    SETTLE_TIMEOUT, or a lost monitor, is raised: settings silently left behind would
    be inherited by whatever migrates this QEMU next."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while True:
        try:
            await set_migration(client, caps, params, side)
            return
        except MonitorError as e:
            if not isinstance(e.__cause__, ExecuteError) or loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)


async def reset_capabilities(client: monitor.Monitor, caps: list[str], side: str) -> None:
    """Turn off the migration capabilities an upgrade set (all but `events`), so whatever
    migrates this QEMU next does not inherit them: a lone x-ignore-shared makes an
    ordinary migration fail ("Capability x-ignore-shared is off, but received capability
    is on")."""
    reset = [k for k in caps if k != "events"]
    if reset:
        await _set_once_accepted(client, dict.fromkeys(reset, False), {}, side)


async def reset_on_new_qemu(client: monitor.Monitor, caps: list[str]) -> list[str]:
    """`reset_capabilities` on the QEMU that runs the guest after switchover, where a
    failure is no reason to fail what succeeded: it becomes a note naming the fix."""
    try:
        await reset_capabilities(client, caps, "destination")
    except MonitorError as e:
        return [f"the new QEMU kept the upgrade's migration capabilities ({e}); turn them "
                "off (migrate-set-capabilities) before migrating it with another tool"]
    return []


async def give_back(client: monitor.Monitor, was_running: bool, caps: list[str],
                    params_before: dict[str, Any]) -> list[str]:
    """The source runs as before the upgrade: no migration under way, resumed if it ran,
    our capabilities off and its migration parameters as they were (so whatever
    migrates it next does not inherit ours). Returns what it had to do.

    Call it only once the destination cannot run the guest (killed, or never
    resumed): a `cont` here is what makes the source authoritative again.
    """
    done = []
    status = await cancel_migration(client)
    state: Any = await client.execute("query-status")
    if was_running and not state["running"]:
        await monitor.execute(client, "cont", what="source")
        done.append(f"resumed the guest on the source (it was {state['status']})")
    if status in ACTIVE_MIGRATION:
        raise MonitorError(
            f"the source QEMU's migration is stuck in '{status}': it did not stop within "
            f"{CANCEL_TIMEOUT:.0f} s of migrate_cancel (seen with multifd on QEMU 10.0 and "
            "11.1 when the destination dies or stalls while the migration sets up). The "
            "guest runs on the source, which now refuses new migration settings and any "
            "further migration",
            "restart the VM when convenient (stop and start it, or reboot the guest): until "
            "then its QEMU can be neither migrated nor upgraded")
    await reset_capabilities(client, caps, "source")
    if params_before:
        await _set_once_accepted(client, {}, params_before, "source")
    return done


class SourceSession:
    """The source as the engine holds it: process facts, state, monitor, and our changes."""

    def __init__(self, proc: SourceProcess, state: SourceState, client: monitor.Monitor):
        self.proc, self.state, self.client = proc, state, client
        self.caps: list[str] = []
        self.params_before: dict[str, Any] = {}
        self.follower: asyncio.Future[None] | None = None  # the engine's progress poll
        # The source's STOP event: when migration stopped the guest's vCPUs (QEMU's clock).
        self.stops = EventListener(("STOP",))
        register = getattr(client, "register_listener", None)  # a QMPClient, not libvirt's
        if register is not None:
            register(self.stops)

    def stopped_at(self) -> float | None:
        """The host time (s) of the source's last STOP event, if one was seen."""
        times = [event_time(e) for e in self.stops.clear()]
        return times[-1] if times else None

    def note_migration(self, caps: dict[str, bool], params: dict[str, Any]) -> None:
        """Note what `give_back` must restore once the mode's settings are set."""
        self.caps = list(caps)
        before = self.state.parameters
        self.params_before = {k: before[k] for k in params if k in before}

    async def set_migration(self, caps: dict[str, bool], params: dict[str, Any]) -> None:
        self.note_migration(caps, params)
        await set_migration(self.client, caps, params, "source")

    async def give_back(self) -> None:
        await give_back(self.client, self.state.running, self.caps, self.params_before)

    async def cancel_migration(self) -> None:
        await cancel_migration(self.client)

    async def disconnect(self) -> None:
        """Let go of the monitor, once the progress poll has had its last reply."""
        follower, self.follower = self.follower, None
        if follower is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(follower, CANCEL_TIMEOUT)
        with contextlib.suppress(Exception):
            await self.client.disconnect()
