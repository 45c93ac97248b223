"""Unit tests: --convert-ram planning and the command line it gives (pure logic)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from liveupgrade import ramconvert
from liveupgrade.cmdline import CommandLine
from liveupgrade.errors import Refused
from liveupgrade.inventory import possible_modes
from liveupgrade.memory import layout
from liveupgrade.versions import QemuVersion

V72, V100, V111 = QemuVersion(7, 2, 22), QemuVersion(10, 0, 2), QemuVersion(11, 1, 3)
ANON = [{"id": "pc.ram", "size": 1 << 30, "share": False}]


def test_memfd_for_a_new_target_and_the_implicit_ram_named_as_its_backend() -> None:
    conv = ramconvert.plan(ramconvert.default_spec(V100), ANON, V100, "u1")
    assert conv.folder is None and conv.aux_ram_share and conv.next_mode == "cpr-transfer"
    cmd = CommandLine.parse(["q", "-m", "1G", "-machine", "pc-i440fx-7.2,accel=tcg"])
    ramconvert.apply(cmd, conv)
    lay = layout(cmd)
    assert lay.all_shared and lay.aux_ram_share and cmd.machine_prop("memory-backend") == "pc.ram"
    assert possible_modes(cmd, V111, "tcg") == ["cpr-transfer", "cpr-exec", "copy"]
    assert possible_modes(cmd, V100, "tcg") == ["cpr-transfer", "copy"]


def test_an_explicit_ram_backend_keeps_its_id_in_a_named_file(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    conv = ramconvert.plan(str(tmp_path), [{"id": "m0", "size": 1 << 20, "share": False}],
                           V72, "u2")
    cmd = CommandLine.parse(["q", "-object", "memory-backend-ram,id=m0,size=1M",
                             "-numa", "node,memdev=m0"])
    ramconvert.apply(cmd, conv)
    backend = cmd.by_id("object", "m0")
    assert backend is not None and backend.prop("qom-type") == "memory-backend-file"
    assert backend.prop("mem-path") == str(tmp_path / "u2-m0.ram") and not conv.aux_ram_share
    assert layout(cmd).all_in_shared_files and conv.next_mode == "shared"


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="already shareable"):
        ramconvert.plan("memfd", [{"id": "pc.ram", "size": 1, "share": True}], V100, "u")
    with pytest.raises(Refused, match=r"needs QEMU >= 10\.0"):
        ramconvert.plan("memfd", ANON, V72, "u")
    with pytest.raises(Refused, match="no such folder"):
        ramconvert.plan(str(tmp_path / "absent"), ANON, V100, "u")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /dev/shm: anyone could create the RAM file first
    with pytest.raises(Refused, match="not a private folder"):
        ramconvert.plan(str(shared), ANON, V100, "u")
    link = tmp_path / "link"
    os.symlink(shared, link)
    with pytest.raises(Refused, match="not a private folder"):
        ramconvert.plan(str(link), ANON, V100, "u")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "u-pc.ram.ram").write_bytes(b"")
    with pytest.raises(Refused, match="exists already"):
        ramconvert.plan(str(private), ANON, V100, "u")
