#!/usr/bin/python
# Copyright: liveupgrade developers
# GNU General Public License v2.0+ (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
"""Ansible module: live-upgrade the QEMU binary under running VMs with liveupgrade."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: upgrade
short_description: Live-upgrade the QEMU binary under running VMs
version_added: "0.1.0"
description:
  - Moves running QEMU VMs into a new QEMU process on the same host with C(liveupgrade),
    without rebooting the guests.
  - Without O(vms), every VM on the host that runs stale QEMU code (a binary or library
    replaced by a package upgrade) is upgraded; with O(vms), only those VMs, when they are
    stale or do not run O(to) yet.
  - Idempotent. A VM that already runs the wanted binary is left alone, and a second run
    reports no change.
  - In check mode it runs C(liveupgrade plan) for each VM it would upgrade and changes
    nothing. It reports C(changed) when any VM would be upgraded.
  - A refused or failed upgrade fails the host unless O(fail_on_refusal=false). Before the
    point of no return a failed upgrade leaves the VM running on its old QEMU.
options:
  vms:
    description:
      - The VMs to consider, each a C(-name), UUID or PID. Default is every QEMU on the host.
    type: list
    elements: str
  to:
    description:
      - The new QEMU binary. Default is whatever binary is now at the path each VM was
        started from (what the package upgrade installed).
    type: path
  mode:
    description: How guest RAM is handed over (see C(liveupgrade upgrade --help)).
    type: str
    default: auto
    choices: [auto, shared, cpr-transfer, copy, cpr-exec]
  timeout:
    description: Seconds each upgrade may take before it rolls back.
    type: float
    default: 600
  fail_on_refusal:
    description: Fail the host when any VM is refused or its upgrade fails.
    type: bool
    default: true
  executable:
    description: The command that runs liveupgrade on the managed host.
    type: list
    elements: str
    default: [liveupgrade]
author:
  - liveupgrade developers
"""

EXAMPLES = r"""
- name: Upgrade every VM left on replaced QEMU code
  liveupgrade.qemu.upgrade:

- name: Move two VMs onto a given QEMU build, checking first in check mode
  liveupgrade.qemu.upgrade:
    vms: [web1, db1]
    to: /opt/qemu-10.0/bin/qemu-system-x86_64
    mode: shared
"""

RETURN = r"""
results:
  description: One entry per VM considered for an upgrade.
  returned: always
  type: list
  elements: dict
  contains:
    vm:
      description: The VM's name (or PID when it has none).
      type: str
    pid:
      description: The VM's QEMU PID before the upgrade.
      type: int
    ok:
      description: Whether it was upgraded (in check mode, whether it could be).
      type: bool
    result:
      description: liveupgrade's JSON for the upgrade (or the plan in check mode).
      type: dict
    error:
      description: Why it was refused or failed, with the fix.
      type: str
unchanged:
  description: VMs left alone because they already run the wanted, current binary.
  returned: always
  type: list
  elements: str
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule


def _liveupgrade(module, args):
    """Run liveupgrade with --json; return (exit code, parsed document)."""
    rc, out, err = module.run_command(module.params["executable"] + args + ["--json"])
    try:
        return rc, json.loads(out)
    except ValueError:
        module.fail_json(msg=f"liveupgrade {' '.join(args)} printed no JSON (exit {rc})",
                         stdout=out, stderr=err)


def _matches(row, spec):
    return spec in (row.get("name"), row.get("uuid"), str(row.get("pid")))


def _wanted(module, rows):
    """The VMs to upgrade now, and the ones already as wanted."""
    specs, target = module.params["vms"], module.params["to"]
    if specs:
        missing = [s for s in specs if not any(_matches(r, s) for r in rows)]
        if missing:
            module.fail_json(msg=f"no running QEMU VM named {', '.join(missing)} on this host",
                             results=[], unchanged=[])
        rows = [r for r in rows if any(_matches(r, s) for s in specs)]
    todo, unchanged = [], []
    for row in rows:
        moved = target is not None and os.path.realpath(row["binary"]) != \
            os.path.realpath(_real_binary(target))
        if row["stale"] or (specs and moved):
            todo.append(row)
        else:
            unchanged.append(row.get("name") or str(row["pid"]))
    return todo, unchanged


def _real_binary(path):
    """The QEMU a wrapper script execs (as liveupgrade's own probe finds it), or the path."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return path
    if head.startswith(b"#!"):
        for line in head.decode(errors="replace").splitlines():
            words = line.split()
            if words[:1] == ["exec"] and len(words) > 1:
                return words[1]
    return path


def main():
    module = AnsibleModule(
        argument_spec={
            "vms": {"type": "list", "elements": "str"},
            "to": {"type": "path"},
            "mode": {"type": "str", "default": "auto",
                     "choices": ["auto", "shared", "cpr-transfer", "copy", "cpr-exec"]},
            "timeout": {"type": "float", "default": 600.0},
            "fail_on_refusal": {"type": "bool", "default": True},
            "executable": {"type": "list", "elements": "str", "default": ["liveupgrade"]},
        },
        supports_check_mode=True,
    )
    rc, rows = _liveupgrade(module, ["list"])
    if rc != 0:
        module.fail_json(msg="liveupgrade list failed", detail=rows)
    todo, unchanged = _wanted(module, rows)
    results = []
    for row in todo:
        binary = module.params["to"] or row["binary"]
        verb = "plan" if module.check_mode else "upgrade"
        args = [verb, str(row["pid"]), "--to", binary, "--mode", module.params["mode"]]
        if verb == "upgrade":
            args += ["--timeout", str(module.params["timeout"])]
        rc, doc = _liveupgrade(module, args)
        ok = rc == 0 and bool(doc.get("ok"))
        error = None if ok else (doc.get("error") or "refused: " + "; ".join(
            f"{c['name']}: {c['detail']}" for c in doc.get("checks", []) if not c.get("ok")))
        if error and doc.get("fix"):
            error += f" (fix: {doc['fix']})"
        results.append({"vm": row.get("name") or str(row["pid"]), "pid": row["pid"], "ok": ok,
                        "result": doc if ok else None, "error": error})
    failed = [r for r in results if not r["ok"]]
    changed = any(r["ok"] for r in results)
    if failed and module.params["fail_on_refusal"]:
        module.fail_json(msg="; ".join(f"{r['vm']}: {r['error']}" for r in failed),
                         changed=changed, results=results, unchanged=unchanged)
    module.exit_json(changed=changed, results=results, unchanged=unchanged)


if __name__ == "__main__":
    main()
