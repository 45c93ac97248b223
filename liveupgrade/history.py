"""The last upgrade of each VM: what `liveupgrade metrics` reports.

One small JSON file per VM (by the transaction key: its UUID, or pid-N),
replaced atomically after every upgrade that got as far as taking the VM's
lock, successful or not. Root keeps them in /var/lib/liveupgrade/upgrades
(they outlive a reboot, as the metrics' "last upgrade" should); other users
under $XDG_STATE_HOME; LIVEUPGRADE_STATE_DIR overrides both. Writing it never
fails an upgrade.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from liveupgrade.report import UpgradeResult


def state_dir() -> Path:
    if os.environ.get("LIVEUPGRADE_STATE_DIR"):  # e.g. a test suite's own folder
        return Path(os.environ["LIVEUPGRADE_STATE_DIR"]) / "upgrades"
    if os.geteuid() == 0:
        return Path("/var/lib/liveupgrade/upgrades")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "liveupgrade" / "upgrades"


def note(key: str, vm: str, result: UpgradeResult | None, error: str | None) -> None:
    """Record the outcome of an upgrade of `vm` (best effort)."""
    record: dict[str, Any] = {"vm": vm, "key": key, "time": round(time.time(), 3),
                              "ok": result is not None, "error": error}
    if result is not None:
        record |= {"uuid": result.uuid, "name": result.name, "mode": result.mode,
                   "source_version": result.source_version,
                   "target_version": result.target_version,
                   "vcpu_pause_ms": result.vcpu_pause_ms, "downtime_ms": result.downtime_ms,
                   "pid": result.destination_pid}
    with contextlib.suppress(OSError):
        folder = state_dir()
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = folder / f".{key}.json.{os.getpid()}"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / f"{key}.json")


def last_upgrades() -> dict[str, dict[str, Any]]:
    """Every VM's last recorded upgrade, by key."""
    found: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(OSError):
        for path in state_dir().glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                found[str(record["key"])] = record
    return found
