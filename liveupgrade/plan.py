"""Build the destination's command line from the source's.

Pure logic over parsed data: the same inputs always give the same plan, so
it is unit-tested without QEMU and shown to operators before anything runs.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from liveupgrade import ramconvert
from liveupgrade.cmdline import CommandLine, Option
from liveupgrade.endpoints import ENGINE_MONITOR_ID, held_paths, private_sibling, relocate
from liveupgrade.errors import Refused, UsageError
from liveupgrade.handover import (
    SourceFds,
    VncHandover,
    client_sockets,
    held_elsewhere,
    rewrite_listeners,
    rewrite_log,
    rewrite_taps,
    rewrite_vnc,
)
from liveupgrade.modes import Mode
from liveupgrade.ramconvert import RamConversion
from liveupgrade.versions import QemuVersion

# What --set may change: host-side properties only, never guest-visible hardware.
OVERRIDABLE = {
    "drive": {"file", "cache", "aio", "discard", "detect-zeroes"},
    "blockdev": {"filename", "aio", "discard", "detect-zeroes", "cache.direct", "cache.no-flush"},
    "chardev": {"path", "logfile"},
}


@dataclass(frozen=True)
class Override:
    """`--set ID.KEY=VALUE`: change one property of the option with that id.

    Both ids (``pc.ram``) and keys (``cache.direct``) may contain dots, so the
    split is decided against the command line: the longest id that exists.
    """

    target: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Override:
        target, sep, value = text.partition("=")
        if not sep or "." not in target.strip(".") or target.startswith("."):
            raise UsageError(f"--set {text!r} is not ID.KEY=VALUE",
                             "e.g. --set disk0.file=/var/lib/images/copy.qcow2")
        return cls(target, value)

    def splits(self) -> list[tuple[str, str]]:
        """Every (id, key) reading of the target, longest id first."""
        dots = [i for i, ch in enumerate(self.target) if ch == "."]
        return [(self.target[:i], self.target[i + 1:]) for i in reversed(dots)]


@dataclass(frozen=True)
class Relocation:
    """A path the destination uses privately until the source has exited."""

    private: Path
    original: Path
    kind: str


@dataclass
class DestinationPlan:
    argv: list[str]
    qmp_path: Path  # the engine's own monitor on the destination
    migrate_path: Path
    cpr_path: Path | None
    relocations: list[Relocation] = field(default_factory=list)
    inherited_fds: list[int] = field(default_factory=list)  # source fds given at start
    tap_fds: list[int] = field(default_factory=list)  # which of them are taps
    handed_over: list[str] = field(default_factory=list)  # what runs on source fds
    vnc: VncHandover | None = None
    log_path: Path | None = None  # the -D file: the destination's stderr appends to it
    connects_out: list[str] = field(default_factory=list)  # client sockets (handover.py)
    vhost_netdevs: list[str] = field(default_factory=list)  # each gets a fresh /dev/vhost-net
    ram_files: list[Path] = field(default_factory=list)  # --convert-ram files it creates
    # multiqueue tap netdevs -> the source's queue fds (the destination gets fresh queues)
    mq_netdevs: dict[str, list[int]] = field(default_factory=dict)


def _set_machine(cmd: CommandLine, machine: str) -> None:
    for opt in cmd.find("machine"):
        if opt.prop("type") is not None:
            opt.set_prop("type", machine)
            return
    cmd.options.insert(0, Option("machine", machine))


# Options a newer QEMU removed, and the -machine property that says the same
# (with the QEMU version that first has that property).
REMOVED_OPTIONS = {
    "no-acpi": ("acpi", "off", QemuVersion(2, 12)),  # QEMU 10.0: "-no-acpi: invalid option"
    "no-hpet": ("hpet", "off", QemuVersion(8, 0)),  # QEMU 10.0: "-no-hpet: invalid option"
}


def _modernize(cmd: CommandLine, target: QemuVersion | None) -> None:
    """Spell removed flags (libvirt 9.0 still writes -no-acpi) as -machine properties."""
    if target is None:
        return
    for name, (prop, value, since) in REMOVED_OPTIONS.items():
        if cmd.has(name) and target >= since:
            cmd.remove(name)
            machine = cmd.first("machine")
            if machine is None:
                cmd.options.insert(0, Option("machine", f"{prop}={value}"))
            else:
                machine.set_prop(prop, value)


def _drop_engine_monitor(cmd: CommandLine) -> None:
    """Remove the monitor an earlier upgrade gave this VM (it has no path any more)."""
    cmd.options = [o for o in cmd.options
                   if not (o.name == "chardev" and o.prop("id") == ENGINE_MONITOR_ID)
                   and not (o.name in ("mon", "object")
                            and o.prop("chardev") == ENGINE_MONITOR_ID)]


def _drop_repeated_data_dirs(cmd: CommandLine) -> None:
    """Keep one -L per folder: a QEMU wrapper that adds its own -L (as a relocated
    install needs) would otherwise add one more with every upgrade."""
    seen: set[str | None] = set()
    kept = []
    for opt in cmd.options:
        if opt.name == "L":
            if opt.value in seen:
                continue
            seen.add(opt.value)
        kept.append(opt)
    cmd.options = kept


def _apply_override(cmd: CommandLine, ov: Override) -> None:
    for ident, key in ov.splits():
        for name in ("drive", "blockdev", "chardev", "device", "object", "netdev"):
            opt = cmd.by_id(name, ident)
            if opt is None:
                continue
            allowed = OVERRIDABLE.get(name, set())
            if key not in allowed:
                raise Refused(f"--set {ov.target}: changing '{key}' of -{name} {ident} "
                              "could change guest-visible hardware or state",
                              f"for -{name}, --set may change: "
                              f"{', '.join(sorted(allowed)) or 'nothing'}")
            opt.set_prop(key, ov.value)
            return
    raise Refused(f"--set {ov.target}: no -drive/-blockdev/-chardev with that id",
                  "use ID.KEY=VALUE with an id from the VM's command line")


FILE_SPEC_OPTIONS = ("serial", "parallel", "debugcon", "virtioconsole")


def _file_chardevs_append(cmd: CommandLine) -> None:
    """The destination must append to log files, never truncate the source's output.

    QEMU opens a file chardev and a chardev's logfile= with O_TRUNC unless
    told append=on / logappend=on; the `-serial file:PATH` spelling has no
    such option, so it becomes a file chardev that has.
    """
    out: list[Option] = []
    for count, opt in enumerate(cmd.options):
        if opt.name in FILE_SPEC_OPTIONS and opt.value and opt.value.startswith("file:"):
            ident = f"lu-file-{opt.name}{count}"
            out.append(Option("chardev", f"file,id={ident},path={opt.value[5:]},append=on"))
            out.append(Option(opt.name, f"chardev:{ident}"))
            continue
        if opt.name == "chardev":
            wanted = {"append": opt.prop("backend") == "file",
                      "logappend": opt.prop("logfile") is not None}
            for key in (k for k, needed in wanted.items() if needed):
                if opt.is_json:  # JSON wants a boolean
                    opt.value = json.dumps({**opt.json(), key: True}, separators=(",", ":"))
                else:
                    opt.set_prop(key, "on")
        out.append(opt)
    cmd.options = out


def for_target(source_argv: list[str], target_binary: Path, machine: str,
               target_version: QemuVersion | None) -> CommandLine:
    """The source's command line for the new binary, whichever way it starts: no -S,
    -incoming or -daemonize, no earlier upgrade's monitor, the machine type pinned,
    options the target dropped rewritten."""
    cmd = CommandLine.parse(source_argv)
    cmd.binary = str(target_binary)
    for name in ("S", "incoming", "daemonize"):
        cmd.remove(name)
    _drop_engine_monitor(cmd)
    _drop_repeated_data_dirs(cmd)
    _set_machine(cmd, machine)
    _modernize(cmd, target_version)
    return cmd


def finish_for_target(cmd: CommandLine, overrides: list[Override] | None,
                      engine_qmp: Path, qmp_object: bool = False) -> None:
    """File chardevs appended to, the operator's --set overrides, the engine's monitor:
    `-object monitor-qmp` where the target has it (QEMU 11.1 warns that `-mon` is
    deprecated), else `-mon`."""
    _file_chardevs_append(cmd)
    for ov in overrides or []:
        _apply_override(cmd, ov)
    cmd.add("chardev", f"socket,id={ENGINE_MONITOR_ID},path={engine_qmp},server=on,wait=off")
    if qmp_object:
        cmd.add("object", f"monitor-qmp,id={ENGINE_MONITOR_ID}-mon,chardev={ENGINE_MONITOR_ID}")
    else:
        cmd.add("mon", f"chardev={ENGINE_MONITOR_ID},mode=control")


def build_destination(source_argv: list[str], *, target_binary: Path, machine: str,
                      mode: Mode, rundir: Path, overrides: list[Override] | None = None,
                      token: str | None = None, fds: SourceFds | None = None,
                      numbers: Mapping[int, int] | None = None,
                      vhost_fds: Mapping[str, int] | None = None,
                      queue_fds: Mapping[str, list[int]] | None = None,
                      target_version: QemuVersion | None = None,
                      ram: RamConversion | None = None,
                      qmp_object: bool = False) -> DestinationPlan:
    """The destination argv: the source's, with the changes an upgrade needs.

    - the new binary, and the source's concrete versioned machine type;
    - -S and -incoming defer (plus the cpr channel for cpr-transfer);
    - taps and listening sockets on the source's own descriptors (`fds`,
      numbered in the destination as `numbers` says; see handover.py), a vhost
      netdev on a fresh /dev/vhost-net (`vhost_fds`, by netdev id), a multiqueue
      tap on fresh queues of the same device (`queue_fds`, by netdev id);
    - other listening sockets and the pidfile at a private path beside the
      original, moved into place after the source exits;
    - VNC on a private socket until it takes over the source's after switchover;
    - no -D (QEMU would truncate it): stderr appends to that file instead;
    - a monitor of the engine's own in `rundir`;
    - no -daemonize: the engine starts the destination in its own session;
    - flags the target removed (-no-acpi) as the -machine properties they meant;
    - with `ram` (--convert-ram), the RAM block ids backed by shareable memory;
    - file chardevs appended to, and the operator's --set overrides.
    """
    token = token or secrets.token_hex(4)
    cmd = for_target(source_argv, target_binary, machine, target_version)
    if ram is not None:
        ramconvert.apply(cmd, ram)
    facts = fds or SourceFds()
    numbers = numbers or {}
    inherited = facts.at_start(cmd)
    held = held_paths(cmd)
    connects_out = client_sockets(cmd)
    handled, handed_over = rewrite_listeners(cmd, facts, numbers)
    handed_over += rewrite_taps(cmd, facts, numbers, vhost_fds, queue_fds)
    relocations = []
    for h in held_elsewhere(held, handled):
        private = private_sibling(h.path, token)
        relocate(h, private)
        relocations.append(Relocation(private, h.path, h.kind))
    vnc = rewrite_vnc(cmd, facts, rundir / "vnc.sock")
    log_path = rewrite_log(cmd)
    qmp_path = rundir / "qmp.sock"
    migrate_path = rundir / "migrate.sock"
    finish_for_target(cmd, overrides, qmp_path, qmp_object)
    cmd.add("S")
    cmd.add("incoming", "defer")
    cpr_path = None
    if mode is Mode.CPR_TRANSFER:
        cpr_path = rundir / "cpr.sock"
        cmd.add("incoming", json.dumps({"channel-type": "cpr", "addr": {
            "transport": "socket", "type": "unix", "path": str(cpr_path)}}))
    taps = sorted(facts.taps.values())
    return DestinationPlan(cmd.argv(), qmp_path, migrate_path, cpr_path, relocations,
                           inherited, taps, handed_over, vnc, log_path, connects_out,
                           sorted(facts.vhost), ram.files if ram else [],
                           dict(facts.mq_taps))
