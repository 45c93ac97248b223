"""`liveupgrade metrics`: what Prometheus reads, parsed by Prometheus' own parser."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from liveupgrade import engine
from liveupgrade.errors import Refused
from rig import FixturePaths, MemoryBacking
from tests.conftest import VMFactory
from tests.helpers import installed_copy, replace_as_a_package_would

pytestmark = pytest.mark.e2e


def samples(text: str) -> dict[tuple[str, str], float]:
    """(metric name, VM name) -> value, for the per-VM samples; ("name", "") for totals."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, sample.labels.get("name", ""))] = sample.value
    return found


async def test_metrics_report_versions_staleness_and_last_upgrades(
        fixtures: FixturePaths, make_vm: VMFactory, tmp_path: Path):
    good = await make_vm(fixtures.qemu_old, backing=MemoryBacking.FILE, name="lu-metrics-ok")
    refused = await make_vm(fixtures.qemu_new, backing=MemoryBacking.FILE,
                            machine="pc-i440fx-10.0", name="lu-metrics-refused")
    started = time.time()
    result = await engine.upgrade(good.pid, fixtures.qemu_new)
    with pytest.raises(Refused, match="machine type"):
        await engine.upgrade(refused.pid, fixtures.qemu_old)
    textfile = tmp_path / "liveupgrade.prom"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "liveupgrade", "metrics", "--textfile", str(textfile),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0 and out == b"", err
    assert textfile.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["liveupgrade.prom"]  # no temp file left
    text = textfile.read_text()
    got = samples(text)
    assert got[("liveupgrade_vms", "")] >= 2
    # The upgraded VM: one info sample naming QEMU 10.0, not stale, a successful last upgrade
    # with the pause QEMU measured, in seconds.
    info = [s for f in text_string_to_metric_families(text) if f.name == "liveupgrade_vm_info"
            for s in f.samples if s.labels["name"] == "lu-metrics-ok"]
    assert len(info) == 1 and info[0].labels["qemu_version"].startswith("10.0")
    assert info[0].labels["pid"] == str(result.destination_pid)
    assert info[0].labels["uuid"] == good.uuid
    assert got[("liveupgrade_vm_stale", "lu-metrics-ok")] == 0
    assert got[("liveupgrade_vm_upgrade_interrupted", "lu-metrics-ok")] == 0
    assert got[("liveupgrade_last_upgrade_success", "lu-metrics-ok")] == 1
    assert started <= got[("liveupgrade_last_upgrade_timestamp_seconds", "lu-metrics-ok")] \
        <= time.time()
    assert result.vcpu_pause_ms is not None
    assert got[("liveupgrade_last_upgrade_vcpu_pause_seconds", "lu-metrics-ok")] == \
        pytest.approx(result.vcpu_pause_ms / 1000, abs=1e-6)
    # The refused one: still on its QEMU, and its last upgrade is a failure.
    assert got[("liveupgrade_last_upgrade_success", "lu-metrics-refused")] == 0
    assert ("liveupgrade_last_upgrade_vcpu_pause_seconds", "lu-metrics-refused") not in got
    # Without --textfile the same document goes to stdout.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "liveupgrade", "metrics", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert samples(out.decode())[("liveupgrade_last_upgrade_success", "lu-metrics-ok")] == 1


async def test_a_stale_vm_is_counted(fixtures: FixturePaths, make_vm: VMFactory,
                                     tmp_path: Path):
    """Stale as after a package upgrade: the binary the VM runs was replaced on disk."""
    binary, wrapper = installed_copy(fixtures, tmp_path)
    vm = await make_vm(wrapper, backing=MemoryBacking.FILE, name="lu-metrics-stale")
    replace_as_a_package_would(binary)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "liveupgrade", "metrics", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    got = samples(out.decode())
    assert got[("liveupgrade_vm_stale", "lu-metrics-stale")] == 1
    assert got[("liveupgrade_stale_vms", "")] >= 1
    assert vm.pid
