"""Shared fixtures: real QEMU binaries, fixture guests, and the accelerator decision."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from rig import FixturePaths, FixtureVM, TapNetwork, VMConfig, find_fixtures
from rig.kvm import decide_accel
from rig.libvirt_vm import LibvirtFixtureVM, ensure_daemons, qemu_for


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Upgrade records (history.py) of the suite's throwaway VMs stay in its own folder;
    the CLI processes the tests start inherit it."""
    path = tmp_path_factory.mktemp("state")
    os.environ["LIVEUPGRADE_STATE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def fixtures() -> FixturePaths:
    """The QEMU pair and guest images; a missing one fails loudly (run ./setup.sh)."""
    return find_fixtures()


@pytest.fixture(scope="session")
def accel(fixtures: FixturePaths) -> str:
    """TCG unless a probe shows KVM really runs guests at speed on this host."""
    return decide_accel(fixtures.qemu_old).accel


def pytest_report_header(config: pytest.Config) -> str:
    try:
        decision = decide_accel(find_fixtures().qemu_old)
    except Exception as e:  # the session fixture will report the real failure
        return f"liveupgrade accelerator: unknown ({e})"
    return f"liveupgrade accelerator: {decision.accel} ({decision.reason})"


VMFactory = Callable[..., Awaitable[FixtureVM]]


@pytest.fixture
async def make_vm(fixtures: FixturePaths, accel: str) -> AsyncIterator[VMFactory]:
    """Boot fixture guests; every one (and any QEMU started from it) dies at teardown."""
    vms: list[FixtureVM] = []

    async def make(binary: Path | None = None, **kwargs: object) -> FixtureVM:
        kwargs.setdefault("accel", accel)
        config = VMConfig(binary=binary or fixtures.qemu_old, **kwargs)  # type: ignore[arg-type]
        vm = FixtureVM(config, fixtures)
        vms.append(vm)
        await vm.start()
        return vm

    yield make
    for vm in vms:
        await vm.close()


@pytest.fixture(scope="session")
def libvirt_daemons() -> list[str]:
    """libvirtd and virtlogd, started by hand if none runs (no systemd here)."""
    return ensure_daemons()


@pytest.fixture(scope="session")
def libvirt_qemu_new(fixtures: FixturePaths) -> Path:
    """QEMU 10.0 at a path libvirt's QEMU user can execute (the clone may be private)."""
    return qemu_for(fixtures.qemu_new)


@pytest.fixture
async def lvm(libvirt_daemons: list[str], fixtures: FixturePaths
              ) -> AsyncIterator[LibvirtFixtureVM]:
    """A persistent libvirt domain running the microguest on QEMU 7.2."""
    async with LibvirtFixtureVM(fixtures) as vm:
        yield vm


@pytest.fixture
def network() -> Iterator[TapNetwork]:
    """A private network namespace with a tap for a guest's NIC (rig.netns)."""
    with TapNetwork() as net:
        yield net
