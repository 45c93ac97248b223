"""--convert-ram: one copy-mode upgrade that moves anonymous guest RAM onto shareable memory.

Most VMs run on anonymous RAM (libvirt's and Proxmox's default), so every
upgrade of theirs copies all of it. A migration only needs the destination's
RAM blocks to have the source's ids (QEMU: `Unknown ramblock "pc.ram", cannot
accept migration` otherwise), not the same backing. So the destination gets
the same ids backed by shareable memory, the RAM is copied once, and from then
on the VM's own command line plans a zero-copy mode:

- memfd, share=on, with `-machine aux-ram-share=on` (default where the target
  has aux-ram-share, QEMU >= 10.0): the next upgrade is cpr-transfer. Nothing
  is left on disk when the VM ends.
- a named file in a folder the operator gives (tmpfs, /dev/shm, hugetlbfs),
  share=on: the next upgrade is `shared`, with any QEMU >= 4.0. The file stays
  until it is removed, like any mem-path file: it outlives the VM.

The ids and sizes come from the source's own `query-memdev` (the implicit
default RAM is there too, as "pc.ram" on a PC), never from guessing.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveupgrade.cmdline import CommandLine
from liveupgrade.errors import Refused
from liveupgrade.versions import QemuVersion

MEMFD = "memfd"
DEFAULT_FOLDER = Path("/dev/shm/liveupgrade-ram")  # made 0700 at upgrade time if missing
AUX_RAM_SHARE_SINCE = 10  # the first QEMU with -machine aux-ram-share


@dataclass(frozen=True)
class RamConversion:
    """Which RAM blocks move onto what."""

    blocks: tuple[tuple[str, int], ...]  # (RAM block id, size in bytes), each anonymous today
    folder: Path | None  # named files in this folder; None: memfd
    aux_ram_share: bool
    name: str  # the VM's UUID (or key): the files are named after it

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.blocks)

    def file_for(self, ident: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.name}-{ident}.ram"

    @property
    def files(self) -> list[Path]:
        return [self.file_for(ident) for ident, _ in self.blocks] if self.folder else []

    @property
    def next_mode(self) -> str:
        return "shared" if self.folder else "cpr-transfer"

    def describe(self) -> str:
        onto = (f"named files in {self.folder} (share=on)" if self.folder
                else "memfd (share=on)")
        blocks = ", ".join(f"{ident} ({size >> 20} MiB)" for ident, size in self.blocks)
        return (f"guest RAM {blocks} is copied onto {onto}"
                f"{' with aux-ram-share=on' if self.aux_ram_share else ''}; the next upgrade "
                f"can be {self.next_mode} (zero-copy); extra host memory while copying: "
                f"{self.total_bytes >> 20} MiB, freed when the old QEMU exits")


def plan(spec: str, memdevs: list[dict[str, Any]], target: QemuVersion,
         name: str, owner: int = 0) -> RamConversion:
    """What `--convert-ram SPEC` ("memfd" or a folder) does to this VM (Refused: why not).

    A folder must be private to root or to `owner` (the VM's uid): guest RAM is
    written to a file whose name is predictable, so in a folder another user can
    write to (/dev/shm itself), that user could create the file first and read
    the guest's memory.
    """
    blocks = tuple((str(m["id"]), int(m["size"])) for m in memdevs
                   if not m.get("share") and m.get("id"))
    if not blocks:
        raise Refused("guest RAM is already shareable: there is nothing to convert",
                      "upgrade without --convert-ram; plan shows the zero-copy mode it takes")
    aux = target.at_least(AUX_RAM_SHARE_SINCE)
    if spec == MEMFD:
        if not aux:
            raise Refused(f"--convert-ram memfd needs QEMU >= 10.0 (aux-ram-share) as the "
                          f"target, which is {target}",
                          "name a folder on tmpfs instead: --convert-ram /dev/shm/FOLDER")
        return RamConversion(blocks, None, True, name)
    folder = Path(spec)
    if not folder.is_dir() and folder != DEFAULT_FOLDER:
        raise Refused(f"--convert-ram {spec}: no such folder",
                      "create it (mode 0700, owned by the VM's user) or use memfd")
    if folder.exists() or folder.is_symlink():
        info = os.lstat(folder)
        if (not stat.S_ISDIR(info.st_mode) or info.st_uid not in (0, owner)
                or info.st_mode & 0o022):
            raise Refused(f"--convert-ram {folder}: not a private folder (a symlink, owned by "
                          f"uid {info.st_uid}, or mode {stat.S_IMODE(info.st_mode):04o}): "
                          "another user could create the RAM file first and read guest memory",
                          "name a folder owned by root or the VM's user, mode 0700")
    conversion = RamConversion(blocks, folder, aux, name)
    taken = [str(f) for f in conversion.files if f.exists()]
    if taken:
        raise Refused(f"--convert-ram: {', '.join(taken)} exists already",
                      "remove it if no VM uses it, or name another folder")
    fs = os.statvfs(folder if folder.is_dir() else folder.parent)
    free = fs.f_bavail * fs.f_frsize
    if free < conversion.total_bytes:
        raise Refused(f"--convert-ram {folder}: {free >> 20} MiB free, the guest RAM needs "
                      f"{conversion.total_bytes >> 20} MiB", "name a folder with room")
    return conversion


def default_spec(target: QemuVersion) -> str:
    """memfd where the target can pass it on (cpr-transfer), else a folder in /dev/shm."""
    return MEMFD if target.at_least(AUX_RAM_SHARE_SINCE) else str(DEFAULT_FOLDER)


def apply(cmd: CommandLine, conversion: RamConversion) -> None:
    """Back each converted RAM block id with the shareable memory, in place."""
    for ident, size in conversion.blocks:
        spec = (f"memory-backend-file,id={ident},size={size},"
                f"mem-path={conversion.file_for(ident)},share=on" if conversion.folder
                else f"memory-backend-memfd,id={ident},size={size},share=on")
        existing = cmd.by_id("object", ident)
        if existing is not None:  # an explicit memory-backend-ram: same id, new backing
            existing.value = spec
        else:  # the machine's implicit RAM: name it as its backend
            cmd.add("object", spec)
            cmd.add("machine", f"memory-backend={ident}")
    if conversion.aux_ram_share:
        cmd.add("machine", "aux-ram-share=on")
