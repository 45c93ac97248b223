"""What an upgrade did, for people (`summary`) and machines (`to_json`)."""

from __future__ import annotations

import dataclasses
import enum
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from liveupgrade.errors import Refused

if TYPE_CHECKING:
    from liveupgrade.context import SourceContext
    from liveupgrade.modes import Transfer
    from liveupgrade.plan import DestinationPlan
    from liveupgrade.preflight import Preflight
    from liveupgrade.source import SourceProcess, SourceState
    from liveupgrade.target import TargetInfo


@dataclass(frozen=True)
class UpgradeEvent:
    """Progress, passed to `on_event`: a phase change or a transfer figure."""

    phase: str
    message: str
    ram_transferred: int | None = None
    ram_total: int | None = None


@dataclass
class UpgradeResult:
    """The outcome of one successful upgrade."""

    name: str | None
    uuid: str
    machine: str
    mode: str
    mode_reason: str
    source_pid: int
    destination_pid: int
    source_version: str
    target_version: str
    target_binary: str
    guest_running: bool
    downtime_ms: int | None = None  # QEMU's own figure, from query-migrate on the source
    # The guest's vCPU pause: the source's STOP event to the destination's RESUME event,
    # both stamped by QEMU on the host's clock (None for a VM that was paused anyway).
    vcpu_pause_ms: float | None = None
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    ram_transferred_bytes: int | None = None
    bytes_transferred: int | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    destination_argv: list[str] = field(default_factory=list)
    moved_paths: list[str] = field(default_factory=list)
    handed_over: list[str] = field(default_factory=list)  # taps, sockets, display

    def to_json(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, enum.Enum):
                return value.value
            return value
        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpgradeResult:
        """The result an `upgrade --json` printed (its extra keys, like "ok", left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v:.0f} ms" for k, v in self.phases_ms.items())
        lines = [
            f"upgraded {self.name or self.uuid}: "
            f"QEMU {self.source_version} -> {self.target_version}",
            f"  mode: {self.mode} ({self.mode_reason})",
            f"  pid {self.source_pid} -> {self.destination_pid}, machine {self.machine}, "
            f"guest {'running' if self.guest_running else 'paused, as it was'}",
            f"  guest paused {_ms(self.vcpu_pause_ms)} (QEMU's STOP -> RESUME events), "
            f"QEMU downtime {self.downtime_ms} ms, total {self.total_time_ms} ms, "
            f"RAM sent {_size(self.ram_transferred_bytes)}",
            f"  phases: {phases}",
        ]
        lines += [f"  handed over: {item}" for item in self.handed_over]
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@dataclass
class PlanReport:
    """What `plan` shows and `upgrade` acts on: the checks, the mode, the destination."""

    vm: SourceProcess
    state: SourceState
    target: TargetInfo
    preflight: Preflight
    transfer: Transfer | None
    destination: DestinationPlan | None
    context: SourceContext | None = None
    # The same destination with the source fds renumbered as the engine holds them,
    # fresh vhost-net descriptors and fresh tap queues by netdev id.
    rebuild: Callable[[dict[int, int], dict[str, int], dict[str, list[int]]],
                      DestinationPlan] | None = None
    # cpr-exec: what the VM's own process execs (the destination above is only rehearsed).
    exec_argv: list[str] | None = None

    @property
    def ok(self) -> bool:
        return not self.preflight.failures and self.destination is not None

    def refusal(self) -> Refused:
        failures = self.preflight.failures
        lines = [f"{c.name}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "")
                 for c in failures]
        forceable = [c.name for c in failures if c.forceable]
        fix = "fix the failed checks"
        if forceable:
            fix += f"; or accept the risk with --force {' --force '.join(forceable)}"
        return Refused("preflight checks failed: " + "; ".join(lines), fix)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "pid": self.vm.pid, "name": self.state.name, "uuid": self.state.uuid,
            "machine": self.state.machine, "source_version": str(self.state.version),
            "target_version": str(self.target.version), "target_binary": str(self.target.path),
            "mode": self.preflight.mode.value if self.preflight.mode else None,
            "mode_reason": self.preflight.reason,
            "checks": [c.to_json() for c in self.preflight.checks],
            "destination_argv": self.destination.argv if self.destination else None,
            "relocations": [{"private": str(r.private), "original": str(r.original),
                             "kind": r.kind} for r in self.destination.relocations]
            if self.destination else [],
            "inherited_fds": self.destination.inherited_fds if self.destination else [],
            "handed_over": self.destination.handed_over if self.destination else [],
            "client_sockets": self.destination.connects_out if self.destination else [],
            "exec_argv": self.exec_argv,
        }

    def render(self) -> str:
        lines = [f"plan for {self.state.name or self.state.uuid} (PID {self.vm.pid}): "
                 f"QEMU {self.state.version} -> {self.target.version} at {self.target.path}",
                 f"mode: {self.preflight.mode.value if self.preflight.mode else 'none'}"
                 f"{' (' + self.preflight.reason + ')' if self.preflight.reason else ''}",
                 "checks:"]
        for c in self.preflight.checks:
            verdict = "PASS" if c.ok else ("FORCED" if c.forced else "FAIL")
            lines.append(f"  {verdict:<6} {c.name:<26} {c.detail}")
            if c.fix and not c.ok:
                lines.append(f"  {'':<6} {'':<26} fix: {c.fix}"
                             + ("" if c.forceable else " (cannot be forced)"))
        if self.exec_argv:
            lines += ["cpr-exec: first the new QEMU is rehearsed on the command line below "
                      "(started paused, then stopped);",
                      "then the VM's own process (same PID) execs, keeping its taps' fds "
                      "and binding its sockets again:", "  " + shlex.join(self.exec_argv)]
        if self.destination:
            lines += [("the rehearsal's command line" if self.exec_argv else
                       "destination command line") + " (the run folder is created at upgrade "
                      "time):",
                      "  " + shlex.join(self.destination.argv)]
            if self.destination.inherited_fds:
                lines.append("fd=N above are the old QEMU's descriptors "
                             f"{', '.join(map(str, self.destination.inherited_fds))}, "
                             "duplicated (pidfd_getfd) and passed at start:")
                lines += [f"  {item}" for item in self.destination.handed_over]
            if self.destination.connects_out:
                lines.append("sockets the VM connects out on (the new QEMU connects too):")
                lines += [f"  {item}" for item in self.destination.connects_out]
            if self.destination.relocations:
                lines.append("moved into place after the old QEMU exits:")
                lines += [f"  {r.private} -> {r.original}" for r in self.destination.relocations]
        lines.append("verdict: " + ("the upgrade can proceed" if self.ok else
                                    "the upgrade would be refused"))
        return "\n".join(lines)
