"""Every check that decides, before anything is touched, whether an upgrade can work.

A failed migration halfway is the worst outcome; a refusal before anything
starts is a good one. `plan` shows these checks; `upgrade` runs the same
ones and refuses on any failure not overridden by name with --force (the
checks that guard against losing the guest cannot be overridden).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from liveupgrade import monitor
from liveupgrade.bugs import KNOWN_BUGS
from liveupgrade.cmdline import CommandLine
from liveupgrade.endpoints import ENGINE_MONITOR_ID
from liveupgrade.errors import MonitorError, Refused
from liveupgrade.handover import SourceFds
from liveupgrade.memory import layout
from liveupgrade.modes import Mode, ModeInputs, choose
from liveupgrade.plan import DestinationPlan
from liveupgrade.source import ACTIVE_MIGRATION, SourceProcess, SourceState
from liveupgrade.target import TargetInfo

# Checks an operator may override with --force. The others (monitor, migration-idle,
# run-state, target-arch, machine-type, mode) mean the upgrade cannot work or would
# lose the guest; known bugs are accepted by their own names (bugs.KNOWN_BUGS).
FORCEABLE = frozenset({"devices", "backends", "cpu-model", "rom-sizes", "host-memory", "paths"})

# The option ROM QEMU loads for a device when no romfile= is given.
DEFAULT_ROMFILE = {
    "virtio-net-pci": "efi-virtio.rom", "e1000": "efi-e1000.rom", "e1000e": "efi-e1000e.rom",
    "rtl8139": "efi-rtl8139.rom", "vmxnet3": "efi-vmxnet3.rom", "ne2k_pci": "efi-ne2k_pci.rom",
    "pcnet": "efi-pcnet.rom", "i82559er": "pxe-eepro100.rom", "VGA": "vgabios-stdvga.bin",
    "cirrus-vga": "vgabios-cirrus.bin", "qxl-vga": "vgabios-qxl.bin",
    "virtio-vga": "vgabios-virtio.bin", "vmware-svga": "vgabios-vmware.bin",
    "bochs-display": "vgabios-bochs-display.bin", "ati-vga": "vgabios-ati.bin",
}


@dataclass
class Check:
    """One preflight check: its name (for --force), verdict, what it saw, and the fix."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    forced: bool = False

    @property
    def forceable(self) -> bool:
        return self.name in FORCEABLE

    @property
    def blocks(self) -> bool:
        return not self.ok and not self.forced

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "forced": self.forced, "detail": self.detail,
                "fix": self.fix, "forceable": self.forceable}


@dataclass
class Preflight:
    checks: list[Check] = field(default_factory=list)
    mode: Mode | None = None
    reason: str = ""

    def add(self, name: str, problem: str | None, ok_detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, problem is None, problem or ok_detail,
                                 "" if problem is None else fix))

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.blocks]


def _missing(used: list[str], available: set[str]) -> list[str]:
    return sorted({u for u in used if u and u not in available})


def _device_drivers(cmd: CommandLine) -> list[str]:
    return [o.prop("driver") or "" for o in cmd.find("device")]


def check_target(pf: Preflight, src: SourceProcess, state: SourceState, src_arch: str,
                 info: TargetInfo) -> None:
    """Architecture, machine type, and every device/object/backend/CPU the VM uses."""
    cmd = src.cmdline
    pf.add("target-arch", None if info.arch == src_arch else
           f"{info.path} emulates {info.arch}, the VM is {src_arch}",
           f"{info.path} is QEMU {info.version} for {info.arch}",
           f"give a qemu-system-{src_arch} binary")
    pf.add("machine-type", None if state.machine in info.machines else
           f"QEMU {info.version} does not support machine type {state.machine}, which the VM runs",
           f"{state.machine} is supported by the target",
           "upgrade to a QEMU that still provides this versioned machine type")
    devices = _missing(_device_drivers(cmd), info.qom_types)
    objects = _missing([o.prop("qom-type") or "" for o in cmd.find("object")
                        if o.prop("chardev") != ENGINE_MONITOR_ID],  # replaced by the plan
                       info.qom_types)
    pf.add("devices", "missing in the target: " + ", ".join(
        [f"-device {d}" for d in devices] + [f"-object {o}" for o in objects])
        if devices or objects else None,
        f"{len(_device_drivers(cmd))} -device and {len(list(cmd.find('object')))} -object types "
        "exist in the target", "install the QEMU package (or module) that provides them")
    chardevs = _missing([o.prop("backend") or "" for o in cmd.find("chardev")],
                        info.chardev_backends)
    netdevs = _missing([o.prop("type") or "" for o in cmd.find("netdev")], info.netdev_types)
    blocks = _missing([o.prop("format") or "" for o in cmd.find("drive")]
                      + [o.prop("driver") or "" for o in cmd.find("blockdev")],
                      info.block_drivers)
    pf.add("backends", "missing in the target: " + ", ".join(
        [f"chardev {c}" for c in chardevs] + [f"netdev {n}" for n in netdevs]
        + [f"block driver {b}" for b in blocks]) if chardevs or netdevs or blocks else None,
        "every chardev, netdev and block backend exists in the target",
        "install the target's optional modules (e.g. qemu-block-extra)")
    cpu = cmd.first("cpu")
    model = cpu.prop("model") if cpu is not None else None
    pf.add("cpu-model", f"CPU model {model} is unknown to the target"
           if model and model not in info.cpu_models else None,
           f"CPU model {model or '(default)'} exists in the target",
           "use a target that knows this CPU model")


def _rom_file(info: TargetInfo, cmd: CommandLine, name: str) -> Path | None:
    dirs = [o.value for o in cmd.find("L") if o.value] + info.data_dirs
    for d in dirs:
        candidate = Path(d) / name
        if candidate.is_file():
            return candidate
    return None


def _pow2ceil(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


async def check_roms(pf: Preflight, client: monitor.Monitor, src: SourceProcess,
                     info: TargetInfo) -> None:
    """ROM and firmware sizes: a mismatch fails only at the very end of a migration
    ("Length mismatch" / "Size mismatch"), so compare them first."""
    try:
        text = await monitor.execute(client, "human-monitor-command",
                                     {"command-line": "info ramblock"})
    except MonitorError as e:
        pf.add("rom-sizes", f"cannot list the source's RAM blocks: {e}", "", "")
        return
    blocks: dict[str, int] = {}
    # "NAME  4 KiB  OFFSET  USED  TOTAL [HVA RO]": 7.2 and 10.0 differ only after TOTAL.
    for line in str(text).splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6 and parts[4].startswith("0x"):
            blocks[parts[0]] = int(parts[4], 16)
    cmd = src.cmdline
    bios = cmd.first("bios")
    wanted: dict[str, tuple[str, bool]] = {"pc.bios": (bios.value if bios and bios.value
                                                       else "bios-256k.bin", False)}
    for dev in cmd.find("device"):
        driver = dev.prop("driver") or ""
        romfile = dev.prop("romfile") or DEFAULT_ROMFILE.get(driver)
        if romfile:
            for block in blocks:
                if block.endswith(f"/{driver}.rom"):
                    wanted[block] = (romfile, True)
    problems, compared = [], 0
    for block, (filename, is_option_rom) in wanted.items():
        if block not in blocks:
            continue
        path = Path(filename) if os.path.isabs(filename) else _rom_file(info, cmd, filename)
        if path is None:
            problems.append(f"{block}: the target has no {filename}")
            continue
        size = path.stat().st_size
        size = _pow2ceil(size) if is_option_rom else size
        compared += 1
        if size != blocks[block]:
            problems.append(f"{block}: source {blocks[block]:#x}, target's {path} {size:#x}")
    pf.add("rom-sizes", "; ".join(problems) if problems else None,
           f"{compared} ROM/firmware block(s) match the target's files",
           "point the target at the source's firmware with -L (a wrapper), or set romfile= "
           "to a file of the same size")


def check_source(pf: Preflight, state: SourceState) -> None:
    pf.add("monitor", None, "the QMP monitor answered and no other client holds it")
    pf.add("migration-idle", f"a migration is {state.migration_status} on this VM"
           if state.migration_status in ACTIVE_MIGRATION else None,
           "no migration is running", "wait for it to end, or cancel it with migrate_cancel")
    pf.add("run-state", None if state.status in ("running", "paused", "prelaunch") else
           f"the VM is in state '{state.status}'", f"the VM is {state.status}",
           "upgrade a VM that is running or paused")


def check_mode(pf: Preflight, requested: Mode, facts: ModeInputs) -> None:
    try:
        pf.mode, pf.reason = choose(requested, facts)
        pf.add("mode", None, f"{pf.mode.value}: {pf.reason}")
    except Refused as e:
        pf.add("mode", str(e), "", e.fix)
    for bug in KNOWN_BUGS.values():
        hit = bug.hits(facts.source_version)
        relevant = (bug.key == "tcg-dirty-bitmap" and facts.tcg and pf.mode is Mode.COPY) or (
            bug.key == "ignore-shared-memfd" and facts.memory.has_shared_memfd_or_ram
            and pf.mode is Mode.SHARED)
        detail = (f"{bug.summary}; source QEMU {facts.source_version}"
                  f"{' is affected' if hit else ' has the fix'} ({bug.source})")
        status = f"accepted with --force {bug.key}: {detail}" if relevant and hit else (
            f"not relevant to this upgrade: {detail}" if hit else detail)
        pf.checks.append(Check(f"bug:{bug.key}", True, status))


def check_host(pf: Preflight, cmd: CommandLine, ram_bytes: int,
               creates: list[Path] | None = None) -> None:
    """Free memory for a copy, and the files the destination must open (after --set), but
    for those it `creates` (--convert-ram files: ramconvert.plan checked their folder)."""
    if pf.mode is Mode.COPY:
        available = psutil.virtual_memory().available
        pf.add("host-memory", None if available >= ram_bytes else
               f"copy mode needs room for a second copy of the guest's RAM "
               f"({ram_bytes / 2**30:.1f} GiB) but {available / 2**30:.1f} GiB is available",
               f"{available / 2**30:.1f} GiB available for {ram_bytes / 2**30:.1f} GiB of RAM",
               "free host memory, or move the VM to shared memory for zero-copy upgrades")
    paths: list[tuple[str, bool]] = []
    for opt in cmd.find("drive"):
        if opt.prop("file"):
            paths.append((opt.prop("file") or "", (opt.prop("readonly") or "off") == "on"))
    for opt in cmd.find("blockdev"):
        if opt.prop("filename"):
            paths.append((opt.prop("filename") or "", (opt.prop("read-only") or "off") == "on"))
    for ram in layout(cmd).backends:
        if ram.path is not None and ram.path not in (creates or []):
            paths.append((str(ram.path), False))
    bad = [p for p, ro in paths if p.startswith("/")
           and not os.access(p, os.R_OK if ro else os.R_OK | os.W_OK)]
    pf.add("paths", f"the destination could not open: {', '.join(bad)}" if bad else None,
           f"{len(paths)} disk image and memory file path(s) are accessible",
           "restore the files, fix their permissions, or --set a drive to another path")


def check_handover(pf: Preflight, cmd: CommandLine, fds: SourceFds, plan: DestinationPlan,
                   access_problem: str | None) -> None:
    """Taps, listening sockets and displays the destination must take over from the source."""
    problems = []
    if any(o.prop("type") == "tap" for o in cmd.find("net")):
        problems.append("a legacy '-net tap' cannot be handed over (its hub has no id)")
    problems += [f"tap netdev {ident}: {why}" for ident, why in fds.tap_problems.items()]
    needs_fds = bool(plan.inherited_fds or (plan.vnc and plan.vnc.source_fds))
    if needs_fds and access_problem:
        problems.append(access_problem)
    if cmd.has("spice"):
        problems.append("SPICE cannot be handed over: QEMU can neither take a SPICE listening "
                        "socket nor rebind SPICE at runtime, so clients would be refused")
    done = list(plan.handed_over)
    if plan.vnc:
        done.append(f"VNC {plan.vnc.display}: " + (
            f"source fd(s) {', '.join(map(str, plan.vnc.source_fds))} after switchover"
            if plan.vnc.source_fds else "rebound after the old QEMU exits"))
    pf.add("fd-handover", "; ".join(problems) or None,
           "; ".join(done) if done else "no tap device, listening socket or display to hand over",
           "use single-queue -netdev tap (taps), VNC instead of SPICE, and run liveupgrade "
           "as root")
