"""`liveupgrade apt-hook install|remove|status|run`: act when apt replaced QEMU.

`install` writes an apt configuration snippet whose `DPkg::Post-Invoke` runs
`liveupgrade apt-hook run` after every dpkg run, and a policy file the
operator edits. `run` must never fail apt nor hold it up: it looks for stale
VMs (a replaced QEMU binary or mapped library: what a package upgrade leaves
behind), and if the policy says to upgrade them it hands the work to a
detached process and returns; it always exits 0. Every decision and result
goes to a report an operator can find (`REPORT`) and to syslog where a
syslog daemon or the journal listens.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SNIPPET = Path("/etc/apt/apt.conf.d/80liveupgrade")
POLICY = Path("/etc/liveupgrade/apt-hook.conf")
REPORT = Path("/var/log/liveupgrade/apt-hook.log")
ACTIONS = ("off", "report", "upgrade")
DEFAULT_POLICY = """\
# What `liveupgrade apt-hook run` does after apt replaced a QEMU binary or a
# library a running QEMU maps (written by `liveupgrade apt-hook install`).
[apt-hook]
# off: nothing; report: log the stale VMs; upgrade: live-upgrade them.
action = report
# Modes an unattended upgrade may use (auto picks the best of them; a VM that
# needs another mode is only reported): shared, cpr-transfer, copy.
modes = shared, cpr-transfer
# Upgrades at a time, and seconds each may take before it rolls back.
parallel = 1
timeout = 300
"""


@dataclass(frozen=True)
class Policy:
    action: str
    modes: tuple[str, ...]
    parallel: int
    timeout: float

    @classmethod
    def load(cls, path: Path = POLICY) -> Policy:
        """The operator's policy; a missing file means the defaults (action: report)."""
        import configparser

        parser = configparser.ConfigParser()
        parser.read_string(DEFAULT_POLICY)
        with contextlib.suppress(OSError):
            parser.read_string(path.read_text())
        section = parser["apt-hook"]
        action = section.get("action", "report").strip()
        modes = tuple(m.strip() for m in section.get("modes", "").split(",") if m.strip())
        return cls(action if action in ACTIONS else "report", modes,
                   max(1, section.getint("parallel", 1)), section.getfloat("timeout", 300.0))


def command() -> list[str]:
    """How apt runs us: this interpreter and package, by absolute path."""
    return [sys.executable, "-m", "liveupgrade", "apt-hook", "run"]


def snippet_text() -> str:
    # apt hands Post-Invoke lines to sh -c: quote each word for it.
    cmd = " ".join(f"'{word}'" for word in command())
    return ("// Written by `liveupgrade apt-hook install`; remove with "
            "`liveupgrade apt-hook remove`.\n"
            "// After each dpkg run: live-upgrade (or report) VMs left on replaced QEMU code,\n"
            f"// as {POLICY} says. It never fails apt and returns at once.\n"
            f'DPkg::Post-Invoke {{ "{cmd} || true"; }};\n')


def install() -> list[str]:
    """Write the apt snippet and (if missing) the policy; returns what was done."""
    done = []
    SNIPPET.write_text(snippet_text())
    done.append(f"wrote {SNIPPET}")
    if not POLICY.exists():
        POLICY.parent.mkdir(parents=True, exist_ok=True)
        POLICY.write_text(DEFAULT_POLICY)
        done.append(f"wrote {POLICY} (action = report; edit it to upgrade)")
    else:
        done.append(f"kept {POLICY}")
    return done


def remove() -> list[str]:
    """Remove the apt snippet (the policy and report stay, for the record)."""
    if SNIPPET.exists():
        SNIPPET.unlink()
        return [f"removed {SNIPPET}"]
    return [f"{SNIPPET} was not installed"]


def status() -> dict[str, Any]:
    policy = Policy.load()
    last = ""
    with contextlib.suppress(OSError):
        last = REPORT.read_text().strip().splitlines()[-1]
    return {"installed": SNIPPET.exists(), "snippet": str(SNIPPET), "policy": str(POLICY),
            "action": policy.action, "modes": list(policy.modes), "parallel": policy.parallel,
            "timeout": policy.timeout, "report": str(REPORT), "last_report": last}


def note(message: str) -> None:
    """One line to the report and to syslog (where something listens)."""
    import syslog

    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
    with contextlib.suppress(OSError):
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        with REPORT.open("a") as f:
            f.write(line + "\n")
    with contextlib.suppress(OSError):
        syslog.openlog("liveupgrade", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_NOTICE, message)


async def run() -> None:
    """After dpkg: decide quickly, hand any upgrade to a detached worker, never raise."""
    try:
        policy = Policy.load()
        if policy.action == "off":
            return
        from liveupgrade.inventory import list_vms

        stale = [v for v in await list_vms() if v.stale]
        if not stale:
            return
        names = ", ".join(f"{v.name or v.pid} (PID {v.pid}: {v.stale_reasons[0]})" for v in stale)
        if policy.action == "report":
            note(f"apt left {len(stale)} VM(s) on replaced QEMU code: {names}; "
                 "upgrade with: liveupgrade upgrade --all-stale")
            return
        note(f"apt left {len(stale)} VM(s) on replaced QEMU code: {names}; upgrading them "
             "in the background")
        import subprocess

        log = os.open(REPORT, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            subprocess.Popen([sys.executable, "-m", "liveupgrade.apthook", "worker"],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)
        finally:
            os.close(log)
    except Exception as e:  # apt must never fail because of us
        note(f"apt hook failed: {type(e).__name__}: {e}")


async def worker() -> None:
    """The detached part: upgrade each stale VM in a mode the policy accepts."""
    from liveupgrade import engine, fleet
    from liveupgrade.errors import Refused

    policy = Policy.load()

    async def allowed(vm_pid: int, binary: str) -> str:
        """The mode auto would use, if the policy accepts it; else a refusal saying why."""
        report = await engine.plan(vm_pid, binary)
        mode = report.preflight.mode.value if report.preflight.mode else None
        if not report.ok:
            raise report.refusal()
        if mode not in policy.modes:
            raise Refused(f"it needs mode {mode}, which the policy does not allow "
                          f"({', '.join(policy.modes)})", f"edit {POLICY}, or upgrade it by hand")
        return str(mode)

    outcomes = await fleet.upgrade_all_stale(None, policy.parallel, timeout=policy.timeout,
                                             choose_mode=allowed)
    for o in outcomes:
        if o.result is not None:
            note(f"upgraded {o.vm.name or o.vm.pid}: PID {o.vm.pid} -> "
                 f"{o.result.destination_pid}, QEMU {o.result.source_version} -> "
                 f"{o.result.target_version}, mode {o.result.mode}, guest paused "
                 f"{o.result.vcpu_pause_ms} ms")
        elif o.error:
            note(f"NOT upgraded {o.vm.name or o.vm.pid}: {o.error}")
    note("apt hook finished: " + json.dumps({"upgraded": sum(1 for o in outcomes if o.result),
                                             "not_upgraded": sum(1 for o in outcomes
                                                                 if not o.result)}))


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        import asyncio
        asyncio.run(worker())
