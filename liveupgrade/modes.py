"""The four ways to hand a VM's state to the new QEMU, and how one is chosen.

- ``shared``: RAM lives in a share=on file both processes map; with the
  x-ignore-shared capability on both sides only device state and small
  ROM/VRAM blocks cross the socket.
- ``cpr-transfer`` (QEMU >= 10.0 on both sides): the source passes its RAM
  file descriptors over a second "cpr" channel; nothing is copied either.
- ``cpr-exec`` (QEMU >= 10.2 on both sides, never chosen by ``auto``): the VM's
  own process execs the new QEMU, which finds its RAM and keeps the PID; the
  longest pause of the zero-copy modes (the new QEMU starts inside it) and no
  old process to fall back to once the exec is done (cprexec.py).
- ``copy``: classic precopy over a private unix socket, tuned: unlimited or
  --bandwidth, a downtime limit, multifd where both sides have it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from liveupgrade.bugs import IGNORE_SHARED_DROPS_MEMFD, TCG_DIRTY_BITMAP
from liveupgrade.errors import Refused, UsageError
from liveupgrade.memory import MemoryLayout
from liveupgrade.versions import QemuVersion

UNLIMITED_BANDWIDTH = 100 * 1024**3  # bytes/s: more than any local socket moves
MULTIFD_CHANNELS = 2
CPR_EXEC_SINCE = (10, 2)  # the first QEMU with the cpr-exec migration mode


class Mode(enum.Enum):
    AUTO = "auto"
    SHARED = "shared"
    COPY = "copy"
    CPR_TRANSFER = "cpr-transfer"
    CPR_EXEC = "cpr-exec"


@dataclass(frozen=True)
class ModeInputs:
    """The facts a mode choice depends on."""

    memory: MemoryLayout
    source_version: QemuVersion
    target_version: QemuVersion
    source_caps: set[str]
    target_caps: set[str]
    target_params: set[str]
    tcg: bool
    forced: frozenset[str] = frozenset()  # known-bug keys the operator accepts (--force)
    exec_blockers: tuple[str, ...] = ()  # why the VM's process cannot exec (cprexec.blockers)


@dataclass
class Transfer:
    """What the engine sets on each side for the chosen mode."""

    mode: Mode
    reason: str
    source_caps: dict[str, bool] = field(default_factory=dict)
    target_caps: dict[str, bool] = field(default_factory=dict)
    source_params: dict[str, Any] = field(default_factory=dict)
    target_params: dict[str, Any] = field(default_factory=dict)


def _why_not_shared(f: ModeInputs) -> str | None:
    if (f.memory.has_shared_memfd_or_ram and IGNORE_SHARED_DROPS_MEMFD.hits(f.source_version)
            and IGNORE_SHARED_DROPS_MEMFD.key not in f.forced):
        return (f"QEMU {f.source_version}: {IGNORE_SHARED_DROPS_MEMFD.summary} "
                f"(fixed in {IGNORE_SHARED_DROPS_MEMFD.source})")
    if not f.memory.all_in_shared_files:
        return (f"guest RAM is {f.memory.summary}; shared mode needs every RAM backend to be "
                "memory-backend-file with share=on on a file path")
    if "x-ignore-shared" not in f.source_caps or "x-ignore-shared" not in f.target_caps:
        return "x-ignore-shared is missing on one side (needs QEMU >= 4.0)"
    return None


def _why_not_cpr(f: ModeInputs, name: str = "cpr-transfer") -> str | None:
    if not (f.source_version.at_least(10) and f.target_version.at_least(10)):
        return (f"{name} needs QEMU >= 10.0 on both sides (source {f.source_version}, "
                f"target {f.target_version})")
    if "mode" not in f.target_params:
        return "the target has no migration 'mode' parameter"
    older = (f.target_version.major, f.target_version.minor) < (f.source_version.major,
                                                              f.source_version.minor)
    if older:
        return (f"{name} to an older QEMU ({f.source_version.major}."
                f"{f.source_version.minor} -> {f.target_version.major}."
                f"{f.target_version.minor}) fails: the older QEMU cannot load the newer one's "
                "CPR state (measured 11.1 -> 10.0: 'vmstate_load_state error -2')")
    if not f.memory.all_shared:
        return f"guest RAM is {f.memory.summary}; {name} needs share=on memory backends"
    if not f.memory.aux_ram_share:
        return "the source was not started with -machine aux-ram-share=on"
    return None


def _why_not_cpr_exec(f: ModeInputs) -> str | None:
    if min((v.major, v.minor) for v in (f.source_version, f.target_version)) < CPR_EXEC_SINCE:
        return (f"cpr-exec needs QEMU >= 10.2 on both sides (source {f.source_version}, "
                f"target {f.target_version})")
    if "cpr-exec-command" not in f.target_params:
        return "the target has no migration 'cpr-exec-command' parameter"
    return _why_not_cpr(f, "cpr-exec") or ("; ".join(f.exec_blockers) or None)


def _why_not_copy(f: ModeInputs) -> str | None:
    if f.tcg and TCG_DIRTY_BITMAP.hits(f.source_version) and TCG_DIRTY_BITMAP.key not in f.forced:
        return (f"copy mode from QEMU {f.source_version} under TCG is unsafe: "
                f"{TCG_DIRTY_BITMAP.summary} (fixed in {TCG_DIRTY_BITMAP.source}); "
                f"--force {TCG_DIRTY_BITMAP.key} accepts the risk for a guest that is idle")
    return None


def choose(requested: Mode, f: ModeInputs) -> tuple[Mode, str]:
    """The mode to use and why; Refused names why each candidate cannot be used."""
    checks = {Mode.CPR_TRANSFER: _why_not_cpr, Mode.SHARED: _why_not_shared,
              Mode.COPY: _why_not_copy, Mode.CPR_EXEC: _why_not_cpr_exec}
    if requested is not Mode.AUTO:
        problem = checks[requested](f)
        if problem:
            raise Refused(f"{requested.value} mode is not possible: {problem}",
                          "use --mode auto to pick a mode that is possible")
        return requested, "requested with --mode"
    reasons: list[str] = []
    for mode in (Mode.CPR_TRANSFER, Mode.SHARED, Mode.COPY):
        problem = checks[mode](f)
        if problem is None:
            if mode is Mode.CPR_TRANSFER:
                return mode, "zero-copy: RAM file descriptors passed over a cpr channel"
            if mode is Mode.SHARED:
                return mode, "zero-copy: RAM in share=on files, x-ignore-shared on both sides"
            return mode, "RAM copied: " + "; ".join(reasons)
        reasons.append(problem)
    raise Refused("no upgrade mode is safe for this VM: " + "; ".join(reasons),
                  "back guest RAM with -object memory-backend-file,share=on,mem-path=FILE "
                  "(one restart), after which every upgrade is zero-copy")


def transfer_settings(mode: Mode, reason: str, f: ModeInputs, *, bandwidth_mib: float | None,
                      downtime_limit_ms: int) -> Transfer:
    """Capabilities and parameters for both sides of the chosen mode."""
    t = Transfer(mode, reason)
    for side in (t.source_caps, t.target_caps):
        side["events"] = True
    t.source_params["downtime-limit"] = downtime_limit_ms
    t.source_params["max-bandwidth"] = (int(bandwidth_mib * 1024 * 1024) if bandwidth_mib
                                        else UNLIMITED_BANDWIDTH)
    if mode is Mode.SHARED:
        t.source_caps["x-ignore-shared"] = t.target_caps["x-ignore-shared"] = True
    elif mode in (Mode.CPR_TRANSFER, Mode.CPR_EXEC):
        t.source_params["mode"] = mode.value
    elif mode is Mode.COPY and "multifd" in f.source_caps and "multifd" in f.target_caps:
        t.source_caps["multifd"] = t.target_caps["multifd"] = True
        t.source_params["multifd-channels"] = MULTIFD_CHANNELS
        t.target_params["multifd-channels"] = MULTIFD_CHANNELS
    return t


def parse_mode(text: str) -> Mode:
    try:
        return Mode(text)
    except ValueError:
        raise UsageError(f"unknown mode {text!r}",
                         "use one of: " + ", ".join(m.value for m in Mode)) from None
