"""What an upgrade did, for people (`summary`) and machines (`to_json`)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v:.0f} ms" for k, v in self.phases_ms.items())
        lines = [
            f"upgraded {self.name or self.uuid}: "
            f"QEMU {self.source_version} -> {self.target_version}",
            f"  mode: {self.mode} ({self.mode_reason})",
            f"  pid {self.source_pid} -> {self.destination_pid}, machine {self.machine}, "
            f"guest {'running' if self.guest_running else 'paused, as it was'}",
            f"  QEMU downtime {self.downtime_ms} ms, total {self.total_time_ms} ms, "
            f"RAM sent {_size(self.ram_transferred_bytes)}",
            f"  phases: {phases}",
        ]
        lines += [f"  handed over: {item}" for item in self.handed_over]
        return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
