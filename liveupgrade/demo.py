"""`liveupgrade demo`: boot a fixture guest on the old QEMU, upgrade it live, measure.

The pause is measured from outside the guest: the largest gap between the
guest's heartbeats as they arrive on the host, which is what a user of the
guest would notice. The guest also checks its memory pattern the whole time.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from liveupgrade import engine, monitor
from liveupgrade.errors import LiveUpgradeError, UsageError
from liveupgrade.report import UpgradeEvent, UpgradeResult
from liveupgrade.source import inspect_process


@dataclass
class DemoOutcome:
    result: UpgradeResult
    pause_ms: float
    heartbeats_checked: int
    sequence_faults: list[str]
    memory_errors: int
    uuid_before: str
    uuid_after: str
    accel: str
    binary_after: str

    @property
    def ok(self) -> bool:
        return (not self.sequence_faults and self.memory_errors == 0
                and self.uuid_before == self.uuid_after)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "pause_ms": round(self.pause_ms, 2),
                "heartbeats_checked": self.heartbeats_checked,
                "sequence_faults": self.sequence_faults, "memory_errors": self.memory_errors,
                "uuid_before": self.uuid_before, "uuid_after": self.uuid_after,
                "accel": self.accel, "binary_after": self.binary_after,
                "upgrade": self.result.to_json()}

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        faults = " except " + ", ".join(self.sequence_faults) if self.sequence_faults else ""
        return (f"{self.result.summary()}\n"
                f"guest-visible pause (largest heartbeat gap seen by the host): "
                f"{self.pause_ms:.1f} ms   [{self.accel}]\n"
                f"guest check: {verdict}: {self.heartbeats_checked} heartbeats in sequence"
                f"{faults}"
                f", {self.memory_errors} memory errors, UUID {self.uuid_after} kept, "
                f"now running {self.binary_after}")


async def _upgrade_as_a_process(pid: int, target: Path, mode: str) -> UpgradeResult:
    """`liveupgrade upgrade` as an operator runs it, in a process of its own: the heartbeat
    reader in this process then never waits behind the engine, and the pause it measures
    is the guest's alone (docs/performance.md)."""
    argv = [sys.executable, "-m", "liveupgrade", "upgrade", str(pid), "--to", str(target),
            "--mode", mode, "--json"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    try:
        data = json.loads(out)
    except ValueError:
        data = {}
    if proc.returncode != 0 or not data.get("ok"):
        raise LiveUpgradeError(f"the upgrade failed: {data.get('error') or err.decode().strip()}",
                               data.get("fix") or "see the message above")
    return UpgradeResult.from_json(data)


def import_rig() -> ModuleType:
    """The test rig (fixture guests, heartbeat reader) from the source checkout.

    It is test harness, not part of the installed tool: it lives in the
    checkout's rig/ folder, found beside this package (an editable install)
    or in the current directory.
    """
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "rig" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module("rig")
    raise UsageError("the demo needs the liveupgrade source checkout (its test rig in rig/ "
                     "and the guests ./setup.sh builds)",
                     "run it from the checkout: ./setup.sh && .venv/bin/python -m liveupgrade demo")


async def run_demo(*, guest: str = "micro", ram_mib: int = 1024, mode: str = "auto",
                   on_event: engine.EventCallback | None = None) -> DemoOutcome:
    rig = import_rig()
    from rig.kvm import decide_accel_async
    from rig.paths import FixturesMissing
    FixtureVM, GuestKind, MemoryBacking, VMConfig = (
        rig.FixtureVM, rig.GuestKind, rig.MemoryBacking, rig.VMConfig)
    try:
        fixtures = rig.find_fixtures()
    except FixturesMissing as e:
        raise LiveUpgradeError(str(e), "run ./setup.sh") from e
    accel = (await decide_accel_async(fixtures.qemu_old)).accel
    kind = GuestKind.LINUX if guest == "linux" else GuestKind.MICRO
    # A VM each mode can move, between QEMUs it works for (docs/compatibility.md).
    old, new, backing = {
        "cpr-transfer": (fixtures.qemu_new, fixtures.qemu_11, MemoryBacking.MEMFD),
        "cpr-exec": (fixtures.qemu_11, fixtures.qemu_11, MemoryBacking.MEMFD),
        "copy": (fixtures.qemu_new, fixtures.qemu_11, MemoryBacking.ANONYMOUS),
    }.get(mode, (fixtures.qemu_old, fixtures.qemu_new, MemoryBacking.FILE))
    config = VMConfig(binary=old, guest=kind, ram_mib=ram_mib, backing=backing,
                      aux_ram_share=backing is MemoryBacking.MEMFD, accel=accel,
                      name="liveupgrade-demo", fill_mib=min(256, ram_mib // 4), dirty_rate_mib=50,
                      heartbeat_us=1000 if kind is GuestKind.MICRO else 10000)
    async with FixtureVM(config, fixtures) as vm:
        await vm.heartbeat.wait_for(lambda log: bool(log.last and log.last.passes >= 1), 120)
        async with vm.qmp() as q:
            uuid_before = (await monitor.execute(q, "query-uuid"))["UUID"]
        if on_event is not None:
            on_event(UpgradeEvent("upgrade", f"running: liveupgrade upgrade {vm.pid} --to {new} "
                                             f"--mode {mode}"))
        # Drawing the first line loads rich, which holds this process's event loop (and the
        # heartbeat reader in it) for ~30 ms: let the reader catch up before measuring.
        await vm.heartbeat.wait_beats(50, 10)
        started = time.monotonic()
        result = await _upgrade_as_a_process(vm.pid, new, mode)
        finished = time.monotonic()
        passes_after = vm.heartbeat.log.last.passes if vm.heartbeat.log.last else 0
        # One whole verify pass on the new QEMU: every page checked after the move.
        await vm.heartbeat.wait_for(
            lambda log: bool(log.last and log.last.passes >= passes_after + 2), 120)
        async with vm.qmp() as q:  # the original QMP path, now served by the new QEMU
            uuid_after = (await monitor.execute(q, "query-uuid"))["UUID"]
        log = vm.heartbeat.log
        last = log.last
        return DemoOutcome(
            result=result, pause_ms=log.max_gap(started, finished).seconds * 1e3,
            heartbeats_checked=len(log.beats), sequence_faults=log.sequence_faults(),
            memory_errors=last.errors if last else -1, uuid_before=uuid_before,
            uuid_after=uuid_after, accel=accel,
            binary_after=inspect_process(result.destination_pid).exe)
