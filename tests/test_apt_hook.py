"""The apt hook, end to end: a real `apt-get install ./pkg.deb` replaces the QEMU binary
a running VM uses, and the hook upgrades the VM without holding up apt."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupgrade import apthook
from liveupgrade.inventory import list_vms
from rig import MemoryBacking
from tests.conftest import VMFactory
from tests.helpers import assert_guest_intact, exe_of, relocatable_qemu

pytestmark = pytest.mark.e2e

PACKAGE = "lu-test-qemu"
PREFIX = Path("/opt/lu-test-qemu/usr")  # QEMU finds modules and firmware relative to bin/
BINARY = PREFIX / "bin" / "qemu-system-x86_64"


def build_deb(tmp_path: Path, version: str) -> Path:
    """A package holding Debian's QEMU 7.2 binary (tests.helpers.relocatable_qemu)."""
    root = tmp_path / f"pkg-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: {version}\nArchitecture: amd64\n"
        "Maintainer: liveupgrade tests <root@localhost>\n"
        "Description: a QEMU binary the liveupgrade tests replace under a running VM\n")
    relocatable_qemu(root / PREFIX.relative_to("/"))
    deb = tmp_path / f"{PACKAGE}_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "-z1", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def apt_install(deb: Path) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(["apt-get", "install", "-y", "-q", "--allow-downgrades", str(deb)],
                          capture_output=True, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert done.returncode == 0, done.stdout + done.stderr
    return time.monotonic() - started, done.stdout + done.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "liveupgrade", *args], capture_output=True,
                          text=True)


@pytest.fixture
def hook_state() -> Iterator[None]:
    """Leave the host's apt configuration, policy and the test package as they were."""
    policy = apthook.POLICY.read_text() if apthook.POLICY.exists() else None
    try:
        yield
    finally:
        cli("apt-hook", "remove")
        if policy is None:
            apthook.POLICY.unlink(missing_ok=True)
        else:
            apthook.POLICY.write_text(policy)
        subprocess.run(["dpkg", "--purge", PACKAGE], capture_output=True)


async def test_apt_replacing_qemu_upgrades_the_vm_through_the_hook(
        hook_state: None, make_vm: VMFactory, tmp_path: Path):
    first, second = build_deb(tmp_path, "1"), build_deb(tmp_path, "2")
    apt_install(first)  # no hook yet
    vm = await make_vm(BINARY, backing=MemoryBacking.FILE, name="lu-apt-hook")
    old_pid = vm.pid
    installed = cli("apt-hook", "install")
    assert installed.returncode == 0, installed.stderr
    snippet = apthook.SNIPPET.read_text()
    assert "DPkg::Post-Invoke" in snippet and "apt-hook' 'run'" in snippet
    apthook.POLICY.write_text("[apt-hook]\naction = upgrade\nmodes = shared\n")
    report_before = apthook.REPORT.read_text() if apthook.REPORT.exists() else ""

    took, _ = apt_install(second)  # replaces the binary the VM runs: it becomes stale

    # apt was not held up by the upgrade (dpkg itself takes most of this).
    assert took < 20, took
    deadline = time.monotonic() + 60
    while True:
        survivors = [p.pid for p in vm.processes()]
        if survivors and old_pid not in survivors:
            break
        assert time.monotonic() < deadline, apthook.REPORT.read_text()[len(report_before):]
        await asyncio.sleep(0.1)
    (new_pid,) = survivors
    assert exe_of(new_pid) == str(BINARY)  # the package's new file, not "(deleted)"
    assert not {v.pid: v for v in await list_vms()}[new_pid].stale
    await assert_guest_intact(vm)
    deadline = time.monotonic() + 30
    while "apt hook finished" not in apthook.REPORT.read_text()[len(report_before):]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    report = apthook.REPORT.read_text()[len(report_before):]
    assert "upgrading them in the background" in report
    assert f"upgraded lu-apt-hook: PID {old_pid} -> {new_pid}" in report, report
    status = cli("apt-hook", "status", "--json")
    assert '"installed": true' in status.stdout and '"action": "upgrade"' in status.stdout
    assert cli("apt-hook", "remove").returncode == 0 and not apthook.SNIPPET.exists()


async def test_report_only_policy_and_a_mode_the_policy_refuses(
        hook_state: None, make_vm: VMFactory, tmp_path: Path):
    first, second, third = (build_deb(tmp_path, v) for v in ("1", "2", "3"))
    apt_install(first)
    vm = await make_vm(BINARY, backing=MemoryBacking.FILE, name="lu-apt-report")
    cli("apt-hook", "install")
    apthook.POLICY.write_text("[apt-hook]\naction = report\n")
    before = apthook.REPORT.read_text() if apthook.REPORT.exists() else ""
    apt_install(second)
    report = apthook.REPORT.read_text()[len(before):]
    assert "apt left 1 VM(s) on replaced QEMU code: lu-apt-report" in report, report
    assert "liveupgrade upgrade --all-stale" in report
    await asyncio.sleep(1)
    assert [p.pid for p in vm.processes()] == [vm.pid]  # reported, not touched
    # Upgrading, but only in cpr-transfer: this 7.2 VM needs shared mode, so it is reported.
    apthook.POLICY.write_text("[apt-hook]\naction = upgrade\nmodes = cpr-transfer\n")
    before = apthook.REPORT.read_text()
    apt_install(third)
    deadline = time.monotonic() + 30
    while "apt hook finished" not in apthook.REPORT.read_text()[len(before):]:
        assert time.monotonic() < deadline, apthook.REPORT.read_text()[len(before):]
        await asyncio.sleep(0.1)
    report = apthook.REPORT.read_text()[len(before):]
    assert "NOT upgraded lu-apt-report: it needs mode shared, which the policy does not " \
        "allow (cpr-transfer)" in report, report
    assert [p.pid for p in vm.processes()] == [vm.pid]
