"""`liveupgrade metrics`: the host's QEMUs and their last upgrades for Prometheus.

Written in node_exporter's textfile-collector format, to stdout or to a file
replaced atomically (node_exporter must never read half a file): point
`--collector.textfile.directory` at its folder and run this from cron or a
timer, or from the apt hook after upgrades.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from liveupgrade import history, journal
from liveupgrade.inventory import VMInfo

# name -> (type, help); one place for what is exported.
METRICS = {
    "liveupgrade_vms": ("gauge", "QEMU processes on this host."),
    "liveupgrade_stale_vms": ("gauge", "QEMU processes running code no longer on disk."),
    "liveupgrade_vm_info": ("gauge", "One per QEMU process (always 1): its QEMU version."),
    "liveupgrade_vm_stale": ("gauge", "1 if the QEMU runs a deleted or replaced binary or "
                             "library."),
    "liveupgrade_vm_upgrade_interrupted": ("gauge", "1 if an upgrade of the VM was interrupted "
                                           "and awaits `liveupgrade recover`."),
    "liveupgrade_last_upgrade_success": ("gauge", "1 if the VM's last upgrade succeeded, 0 if "
                                         "it was refused or failed."),
    "liveupgrade_last_upgrade_timestamp_seconds": ("gauge", "When the VM's last upgrade ended "
                                                   "(Unix time)."),
    "liveupgrade_last_upgrade_vcpu_pause_seconds": ("gauge", "The guest's vCPU pause in its last "
                                                    "upgrade (QEMU's STOP -> RESUME events)."),
    "liveupgrade_last_upgrade_downtime_seconds": ("gauge", "QEMU's own downtime figure in the "
                                                  "VM's last upgrade."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: Any) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()
                          if v is not None) + "}"


def render(vms: Iterable[VMInfo], upgrades: dict[str, dict[str, Any]],
           interrupted: set[str]) -> str:
    """The textfile for these VMs, their last upgrades (by key) and interrupted keys."""
    vms = list(vms)
    samples: dict[str, list[str]] = {name: [] for name in METRICS}
    samples["liveupgrade_vms"].append(f"liveupgrade_vms {len(vms)}")
    samples["liveupgrade_stale_vms"].append(
        f"liveupgrade_stale_vms {sum(1 for v in vms if v.stale)}")
    for vm in vms:
        key = journal.vm_key(vm.uuid, vm.pid)
        who = {"name": vm.name or str(vm.pid), "uuid": vm.uuid or ""}
        info = _labels(**who, pid=vm.pid, qemu_version=vm.version or "unknown",
                       binary=vm.binary)
        samples["liveupgrade_vm_info"].append(f"liveupgrade_vm_info{info} 1")
        samples["liveupgrade_vm_stale"].append(
            f"liveupgrade_vm_stale{_labels(**who)} {int(vm.stale)}")
        samples["liveupgrade_vm_upgrade_interrupted"].append(
            f"liveupgrade_vm_upgrade_interrupted{_labels(**who)} {int(key in interrupted)}")
        last = upgrades.get(key)
        if last is None:
            continue
        samples["liveupgrade_last_upgrade_success"].append(
            f"liveupgrade_last_upgrade_success{_labels(**who)} {int(bool(last['ok']))}")
        samples["liveupgrade_last_upgrade_timestamp_seconds"].append(
            f"liveupgrade_last_upgrade_timestamp_seconds{_labels(**who)} {last['time']}")
        for field, metric in (("vcpu_pause_ms", "liveupgrade_last_upgrade_vcpu_pause_seconds"),
                              ("downtime_ms", "liveupgrade_last_upgrade_downtime_seconds")):
            if last.get(field) is not None:
                samples[metric].append(f"{metric}{_labels(**who)} {last[field] / 1000:.6f}")
    lines = []
    for name, (kind, text) in METRICS.items():
        if samples[name]:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"


async def collect() -> str:
    """The textfile for this host now."""
    from liveupgrade.inventory import list_vms

    interrupted = {j.key for j in journal.journals() if not journal.owners_alive(j.key)}
    return render(await list_vms(), history.last_upgrades(), interrupted)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` whole (a reader sees the old file or the new one), mode 0644."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
