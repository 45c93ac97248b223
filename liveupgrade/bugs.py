"""Known QEMU bugs that lose or corrupt guest state during an upgrade.

Each entry says which versions it hits, under which conditions, and where it
was found or fixed, so a refusal can cite it. Keep the table small and true.
"""

from __future__ import annotations

from dataclasses import dataclass

from liveupgrade.versions import QemuVersion


@dataclass(frozen=True)
class KnownBug:
    key: str
    summary: str
    fixed_in: tuple[int, int]
    source: str

    def hits(self, version: QemuVersion) -> bool:
        return not version.at_least(*self.fixed_in)


IGNORE_SHARED_DROPS_MEMFD = KnownBug(
    key="ignore-shared-memfd",
    summary="x-ignore-shared also skips share=on memfd/ram backends, whose contents the "
            "destination then lacks: guest RAM is lost",
    fixed_in=(8, 1),
    source="QEMU 8.1 (ignore-shared limited to named files); checked on 7.2 here",
)

TCG_DIRTY_BITMAP = KnownBug(
    key="tcg-dirty-bitmap",
    summary="under TCG, precopy misses pages the guest dirties during migration: the "
            "destination guest crashes (seen on 7.2 sources every run)",
    fixed_in=(9, 0),
    source='QEMU 9.0, "physmem: Fix migration dirty bitmap coherency with TCG memory access"',
)


KNOWN_BUGS = {bug.key: bug for bug in (IGNORE_SHARED_DROPS_MEMFD, TCG_DIRTY_BITMAP)}
