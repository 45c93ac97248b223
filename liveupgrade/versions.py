"""QEMU versions, and what each version can do for an upgrade."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class QemuVersion:
    major: int
    minor: int
    micro: int = 0
    package: str = ""

    @classmethod
    def from_qmp(cls, info: dict[str, Any]) -> QemuVersion:
        q = info["qemu"]
        return cls(int(q["major"]), int(q["minor"]), int(q["micro"]),
                   str(info.get("package", "")).strip())

    def at_least(self, major: int, minor: int = 0) -> bool:
        return (self.major, self.minor) >= (major, minor)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.micro}"
        return f"{text} {self.package}" if self.package else text
