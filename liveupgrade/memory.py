"""How a VM's RAM is backed, read from its command line.

Zero-copy modes depend on it: x-ignore-shared needs RAM in a file both
processes open by path; cpr-transfer passes the source's RAM file
descriptors, so memfd works too, but also needs aux-ram-share=on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from liveupgrade.cmdline import CommandLine
from liveupgrade.endpoints import TRUE_WORDS


class Backing(enum.Enum):
    ANONYMOUS = "anonymous"
    FILE_SHARED = "file, share=on"
    FILE_PRIVATE = "file, share=off"
    FILE_UNLINKED = "file in a directory (unlinked), share=on"
    MEMFD_SHARED = "memfd, share=on"
    MEMFD_PRIVATE = "memfd, share=off"
    RAM_SHARED = "memory-backend-ram, share=on"
    PRIVATE = "private"


@dataclass(frozen=True)
class RamBackend:
    ident: str | None
    backing: Backing
    path: Path | None = None


@dataclass(frozen=True)
class MemoryLayout:
    backends: list[RamBackend]
    aux_ram_share: bool

    @property
    def summary(self) -> str:
        return ", ".join(sorted({b.backing.value for b in self.backends})) or "anonymous"

    @property
    def all_in_shared_files(self) -> bool:
        """Every RAM block is a file both QEMUs can open by path (x-ignore-shared)."""
        return bool(self.backends) and all(b.backing is Backing.FILE_SHARED for b in self.backends)

    @property
    def all_shared(self) -> bool:
        """Every RAM block is share=on memory whose fd can be passed (cpr-transfer)."""
        ok = {Backing.FILE_SHARED, Backing.FILE_UNLINKED, Backing.MEMFD_SHARED, Backing.RAM_SHARED}
        return bool(self.backends) and all(b.backing in ok for b in self.backends)

    @property
    def has_shared_memfd_or_ram(self) -> bool:
        return any(b.backing in (Backing.MEMFD_SHARED, Backing.RAM_SHARED) for b in self.backends)


def _backend(cmd: CommandLine, ident: str) -> RamBackend:
    opt = cmd.by_id("object", ident)
    if opt is None:
        return RamBackend(ident, Backing.PRIVATE)
    qom_type = opt.prop("qom-type") or ""
    share = (opt.prop("share") or "off") in TRUE_WORDS
    if qom_type == "memory-backend-file":
        mem_path = Path(opt.prop("mem-path") or "")
        if mem_path.is_dir():
            return RamBackend(ident, Backing.FILE_UNLINKED if share else Backing.FILE_PRIVATE,
                              mem_path)
        return RamBackend(ident, Backing.FILE_SHARED if share else Backing.FILE_PRIVATE, mem_path)
    if qom_type == "memory-backend-memfd":
        # memfd's share defaults to on
        share = (opt.prop("share") or "on") in TRUE_WORDS
        return RamBackend(ident, Backing.MEMFD_SHARED if share else Backing.MEMFD_PRIVATE)
    if qom_type == "memory-backend-ram":
        return RamBackend(ident, Backing.RAM_SHARED if share else Backing.PRIVATE)
    return RamBackend(ident, Backing.PRIVATE)


def layout(cmd: CommandLine) -> MemoryLayout:
    """The backends that hold guest RAM: -machine memory-backend and -numa memdev."""
    idents: list[str] = []
    main = cmd.machine_prop("memory-backend")
    if main:
        idents.append(main)
    for numa in cmd.find("numa"):
        memdev = numa.prop("memdev")
        if memdev and memdev not in idents:
            idents.append(memdev)
    backends = [_backend(cmd, i) for i in idents]
    if not backends:
        legacy = cmd.first("mem-path")
        backends = [RamBackend(None, Backing.FILE_PRIVATE if legacy else Backing.ANONYMOUS,
                               Path(legacy.value or "") if legacy else None)]
    aux = (cmd.machine_prop("aux-ram-share") or "off") in TRUE_WORDS
    return MemoryLayout(backends, aux)
