"""The target probe: real QEMU binaries, and its cache's invalidation."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from liveupgrade import target
from rig import FixturePaths

pytestmark = pytest.mark.e2e


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Only redirects where the cache lives; the probes below start real QEMUs.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


async def test_probe_reports_what_the_binary_supports(fixtures: FixturePaths,
                                                      private_cache: Path) -> None:
    new = await target.probe(fixtures.qemu_new)
    old = await target.probe(fixtures.qemu_old)
    assert (new.version.major, new.version.minor) == (10, 0)
    assert (old.version.major, old.version.minor) == (7, 2)
    assert new.arch == old.arch == "x86_64"
    assert {"pc-i440fx-7.2", "pc-q35-7.2", "pc"} <= old.machines
    assert "pc-i440fx-10.0" in new.machines and "pc-i440fx-10.0" not in old.machines
    assert "x-ignore-shared" in new.capabilities and "mode" in new.parameters
    assert "mode" not in old.parameters
    assert new.real_exe.endswith("qemu-10.0/root/usr/bin/qemu-system-x86_64")  # via the wrapper


async def test_probe_cache_is_used_and_invalidated(fixtures: FixturePaths, private_cache: Path,
                                                   tmp_path: Path) -> None:
    real = tmp_path / "bin" / "qemu-system-x86_64"
    real.parent.mkdir()
    shutil.copy2(os.path.realpath(fixtures.qemu_old), real)
    wrapper = tmp_path / "qemu-wrapper"
    wrapper.write_text("#!/bin/sh\nQEMU_MODULE_DIR=/usr/lib/x86_64-linux-gnu/qemu exec "
                       f"{real} \"$@\"\n")
    wrapper.chmod(0o755)
    first = await target.probe(wrapper)
    assert first.real_exe == str(real)
    assert target.cached_probe(wrapper) == first
    os.utime(real, ns=(1, 1))  # the binary the wrapper execs was replaced
    assert target.cached_probe(wrapper) is None
    again = await target.probe(wrapper)
    assert again == first and target.cached_probe(wrapper) == again
    os.utime(wrapper, ns=(1, 1))  # the wrapper itself changed
    assert target.cached_probe(wrapper) is None


async def test_a_copied_qemu_without_its_modules_is_explained(fixtures: FixturePaths,
                                                               private_cache: Path,
                                                               tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "qemu-system-x86_64"
    copy.parent.mkdir()
    shutil.copy2(os.path.realpath(fixtures.qemu_old), copy)
    with pytest.raises(target.TargetBinaryError, match="could not load module"):
        await target.probe(copy)
