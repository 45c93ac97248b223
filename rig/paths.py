"""Where setup.sh put the QEMU binaries and the built fixture guests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class FixturesMissing(RuntimeError):
    """A binary or guest image the rig needs is not there: setup.sh has not run."""


@dataclass(frozen=True)
class FixturePaths:
    """Absolute paths of everything the rig starts guests with."""

    qemu_old: Path
    qemu_new: Path
    qemu_11: Path  # QEMU 11.1 from trixie-backports, with its own library root
    microguest: Path
    linux_kernel: Path
    linux_initrd: Path


def find_fixtures(root: Path | None = None) -> FixturePaths:
    """Locate the fixtures; environment variables override each binary.

    LIVEUPGRADE_QEMU_OLD / LIVEUPGRADE_QEMU_NEW / LIVEUPGRADE_QEMU_11 point at other QEMU
    builds, so
    the same tests run against an operator's own pair of versions.
    """
    base = root or REPO_ROOT
    build = base / "qemu-fixtures" / "build"
    bins = base / ".deps" / "bin"
    paths = FixturePaths(
        qemu_old=Path(os.environ.get("LIVEUPGRADE_QEMU_OLD", bins / "qemu-system-x86_64-7.2")),
        qemu_new=Path(os.environ.get("LIVEUPGRADE_QEMU_NEW", bins / "qemu-system-x86_64-10.0")),
        qemu_11=Path(os.environ.get("LIVEUPGRADE_QEMU_11", bins / "qemu-system-x86_64-11.1")),
        microguest=build / "microguest.elf",
        linux_kernel=build / "linuxguest-vmlinuz",
        linux_initrd=build / "linuxguest-initrd.gz",
    )
    missing = [str(p) for p in vars(paths).values() if not Path(p).exists()]
    if missing:
        raise FixturesMissing(
            f"test fixtures missing: {', '.join(missing)}; run ./setup.sh from {base} first"
        )
    return paths
