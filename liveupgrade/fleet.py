"""`upgrade --all-stale`: every VM running outdated QEMU code, N at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveupgrade import engine
from liveupgrade.errors import LiveUpgradeError
from liveupgrade.inventory import VMInfo, list_vms
from liveupgrade.report import UpgradeEvent, UpgradeResult


@dataclass
class FleetOutcome:
    vm: VMInfo
    target: str
    result: UpgradeResult | None = None
    error: str | None = None
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.vm.pid, "name": self.vm.name, "uuid": self.vm.uuid,
                "target": self.target, "ok": self.result is not None,
                "result": self.result.to_json() if self.result else None,
                "error": self.error, "fix": self.fix}


async def upgrade_all_stale(target: Path | None, parallel: int = 1,
                            on_event: engine.EventCallback | None = None,
                            choose_mode: Callable[[int, str], Awaitable[str]] | None = None,
                            **options: Any) -> list[FleetOutcome]:
    """Upgrade each stale VM to `target`, or to whatever binary is now at its own path.

    `choose_mode(pid, binary)`, if given, picks each VM's mode or raises a
    LiveUpgradeError saying why that VM is left alone (the apt hook's policy).
    One VM's failure does not stop the others; each outcome says what happened.
    """
    stale = [vm for vm in await list_vms() if vm.stale]
    limit = asyncio.Semaphore(max(1, parallel))

    async def one(vm: VMInfo) -> FleetOutcome:
        binary = str(target or vm.binary)
        outcome = FleetOutcome(vm, binary)
        label = vm.name or str(vm.pid)

        def relay(event: UpgradeEvent) -> None:
            if on_event is not None:
                on_event(UpgradeEvent(event.phase, f"[{label}] {event.message}",
                                      event.ram_transferred, event.ram_total))

        async with limit:
            try:
                chosen = {} if choose_mode is None else {"mode": await choose_mode(vm.pid,
                                                                                   binary)}
                outcome.result = await engine.upgrade(vm.pid, binary, on_event=relay,
                                                      **options | chosen)
            except LiveUpgradeError as e:
                outcome.error, outcome.fix = str(e), e.fix
        return outcome

    return list(await asyncio.gather(*(one(vm) for vm in stale)))
