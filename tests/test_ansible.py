"""The Ansible collection, run by the real ansible-playbook against several inventory hosts
on this machine (connection local), each owning its own fixture VMs."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from liveupgrade.inventory import list_vms
from rig import FixturePaths, FixtureVM, MemoryBacking
from tests.conftest import VMFactory
from tests.helpers import assert_guest_intact, relocatable_qemu, replace_as_a_package_would

pytestmark = pytest.mark.e2e

COLLECTIONS = Path(__file__).resolve().parents[1] / "ansible"
COLLECTION = COLLECTIONS / "ansible_collections" / "liveupgrade" / "qemu"
BIN = Path(sys.executable).parent


def ansible(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    # ansible-core's own default callback; each task result as one line of JSON (-v).
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
           "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", "ANSIBLE_CALLBACK_FORMAT_PRETTY": "False",
           "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, env=env,
                          timeout=300)


RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", re.MULTILINE)
RESULT = re.compile(r"^(?:changed|ok|fatal): \[(\S+)\](?:: FAILED!)? => (\{.*\})$", re.MULTILINE)


@dataclass
class Run:
    code: int
    stats: dict[str, dict[str, int]]  # PLAY RECAP: host -> ok, changed, failed, ...
    module: dict[str, dict[str, Any]]  # host -> the upgrade module's returned data
    output: str


def inventory(tmp_path: Path, hosts: dict[str, dict[str, object]]) -> Path:
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump({"hypervisors": {
        "hosts": hosts,
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                 "liveupgrade_install_qemu": False,  # the QEMU "package" is the test's copy
                 "liveupgrade_executable": [sys.executable, "-m", "liveupgrade"]}}}))
    return path


def playbook(inv: Path, *args: str) -> Run:
    done = ansible("ansible-playbook", "-v", "-i", str(inv), "liveupgrade.qemu.rolling_upgrade",
                   *args)
    recap = done.stdout.split("PLAY RECAP", 1)[-1]
    stats = {host: {k: int(v) for k, v in (kv.split("=") for kv in counts.split())}
             for host, counts in RECAP.findall(recap)}
    module = {}
    for host, text in RESULT.findall(done.stdout):
        data = json.loads(text)
        if "unchanged" in data and "results" in data:  # the upgrade module's own return
            module[host] = data
    assert stats, done.stdout + done.stderr
    return Run(done.returncode, stats, module, done.stdout + done.stderr)


async def stale_vm(make_vm: VMFactory, tmp_path: Path, name: str) -> FixtureVM:
    """A VM on its own "installed" QEMU whose binary a package upgrade then replaced."""
    binary = relocatable_qemu(tmp_path / name / "usr")
    vm = await make_vm(binary, backing=MemoryBacking.FILE, name=name)
    replace_as_a_package_would(binary)
    return vm


async def pids_and_staleness() -> dict[str, tuple[int, bool]]:
    return {v.name or "": (v.pid, v.stale) for v in await list_vms()}


async def test_rolling_upgrade_check_mode_and_idempotence(make_vm: VMFactory, tmp_path: Path):
    vms = [await stale_vm(make_vm, tmp_path, f"lu-ans-{n}") for n in (1, 2, 3)]
    inv = inventory(tmp_path, {f"hv{n}": {"liveupgrade_vms": [f"lu-ans-{n}"]}
                               for n in (1, 2, 3)})
    before = await pids_and_staleness()
    assert all(before[vm.config.name][1] for vm in vms)

    run = playbook(inv, "--check")  # = plan: changed, nothing moves
    assert run.code == 0, run.output
    assert {h: s["changed"] for h, s in run.stats.items()} == {"hv1": 1, "hv2": 1, "hv3": 1}
    assert run.module["hv1"]["results"][0]["result"]["ok"]  # the plan's verdict
    assert await pids_and_staleness() == before

    run = playbook(inv)
    assert run.code == 0, run.output
    assert {h: s["changed"] for h, s in run.stats.items()} == {"hv1": 1, "hv2": 1, "hv3": 1}
    after = await pids_and_staleness()
    for vm in vms:
        pid, stale = after[vm.config.name]
        assert pid != vm.pid and not stale
        await assert_guest_intact(vm)
    # Per-VM results come back as data.
    (result,) = run.module["hv2"]["results"]
    assert result["vm"] == "lu-ans-2" and result["ok"] and result["result"]["mode"] == "shared"
    assert result["result"]["destination_pid"] == after["lu-ans-2"][0]
    assert result["result"]["vcpu_pause_ms"] > 0

    run = playbook(inv)  # idempotent: nothing left to do
    assert run.code == 0 and all(s["changed"] == 0 for s in run.stats.values()), run.stats
    assert run.module["hv1"]["unchanged"] == ["lu-ans-1"]
    assert await pids_and_staleness() == after


async def test_a_refused_vm_stops_the_rollout(fixtures: FixturePaths, make_vm: VMFactory,
                                              tmp_path: Path):
    first = await stale_vm(make_vm, tmp_path, "lu-ans-a")
    # hv2's VM needs a machine type QEMU 7.2 lacks: its upgrade to 7.2 is refused.
    refused = await make_vm(fixtures.qemu_new, backing=MemoryBacking.FILE,
                            machine="pc-i440fx-10.0", name="lu-ans-b")
    last = await stale_vm(make_vm, tmp_path, "lu-ans-c")
    inv = inventory(tmp_path, {
        "hv1": {"liveupgrade_vms": ["lu-ans-a"]},
        "hv2": {"liveupgrade_vms": ["lu-ans-b"], "liveupgrade_to": "/usr/bin/qemu-system-x86_64"},
        "hv3": {"liveupgrade_vms": ["lu-ans-c"]}})
    run = playbook(inv)
    assert run.code != 0
    assert run.stats["hv1"]["changed"] == 1 and run.stats["hv2"]["failed"] == 1, run.stats
    assert "hv3" not in run.stats  # max_fail_percentage 0: the rollout stopped after hv2
    assert "machine type" in run.module["hv2"]["msg"], run.module["hv2"]
    (refusal,) = run.module["hv2"]["results"]
    assert not refusal["ok"] and "pc-i440fx-10.0" in refusal["error"]
    now = await pids_and_staleness()
    assert now["lu-ans-a"][0] != first.pid and not now["lu-ans-a"][1]
    assert now["lu-ans-b"][0] == refused.pid  # untouched, still running
    assert now["lu-ans-c"] == (last.pid, True)  # never reached
    await assert_guest_intact(refused)


def test_module_documentation_matches_its_arguments():
    """The closest offline stand-in for ansible-test sanity's validate-modules: ansible-doc
    parses the documentation, whose options must be exactly the module's arguments."""
    done = ansible("ansible-doc", "-t", "module", "--json", "liveupgrade.qemu.upgrade")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)["liveupgrade.qemu.upgrade"]
    documented = doc["doc"]["options"]
    source = (COLLECTION / "plugins" / "modules" / "upgrade.py").read_text()
    spec = next(node for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.keyword) and node.arg == "argument_spec")
    assert isinstance(spec.value, ast.Dict)
    arguments = {ast.literal_eval(k): ast.literal_eval(v)
                 for k, v in zip(spec.value.keys, spec.value.values, strict=True)
                 if k is not None}
    assert set(documented) == set(arguments)
    for name, option in documented.items():
        assert option["type"] == arguments[name]["type"], name
        assert option.get("default") == arguments[name].get("default"), name
        assert option["description"], name
    assert doc["examples"] and doc["return"]["results"]
    # The example playbook parses as a playbook.
    syntax = ansible("ansible-playbook", "--syntax-check", "-i", "localhost,",
                     "liveupgrade.qemu.rolling_upgrade")
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
