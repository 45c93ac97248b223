"""Unit tests: destination planning and mode choice (pure logic, no QEMU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from liveupgrade.cmdline import CommandLine
from liveupgrade.cprexec import blockers, build_exec_argv
from liveupgrade.endpoints import held_paths, original_path, qmp_paths
from liveupgrade.errors import Refused, UsageError
from liveupgrade.handover import SourceFds
from liveupgrade.memory import Backing, layout
from liveupgrade.modes import Mode, ModeInputs, choose, transfer_settings
from liveupgrade.plan import Override, build_destination
from liveupgrade.versions import QemuVersion
from tests.test_cmdline import PROXMOX

V72, V100, V111 = QemuVersion(7, 2, 22), QemuVersion(10, 0, 2), QemuVersion(11, 1, 3)
SOURCE = [
    "/usr/bin/qemu-system-x86_64", "-name", "vm1", "-uuid", "11111111-2222-3333-4444-555555555555",
    "-machine", "pc,accel=tcg,memory-backend=pc.ram", "-m", "1G",
    "-object", "memory-backend-file,id=pc.ram,size=1G,mem-path=/dev/shm/vm1.ram,share=on",
    "-qmp", "unix:/run/vm1/qmp.sock,server,nowait",
    "-chardev", "socket,id=con,path=/run/vm1/console.sock,server=on,wait=on",
    "-serial", "chardev:con", "-chardev", "socket,id=hb,path=/run/hb.sock",
    "-chardev", "file,id=log,path=/var/log/vm1.log", "-pidfile", "/run/vm1/pid",
    "-daemonize", "-drive", "file=/img/vm1.qcow2,if=none,id=disk0",
]


def plan(argv=SOURCE, mode=Mode.SHARED, overrides=None):
    return build_destination(argv, target_binary=Path("/opt/qemu10/bin/qemu-system-x86_64"),
                             machine="pc-i440fx-7.2", mode=mode, rundir=Path("/run/lu/x"),
                             overrides=overrides, token="t0k")


def test_destination_command_line() -> None:
    p = plan()
    argv = p.argv
    assert argv[0] == "/opt/qemu10/bin/qemu-system-x86_64"
    cmd = CommandLine.parse(argv)
    assert cmd.machine_prop("type") == "pc-i440fx-7.2"  # the alias pinned to the concrete type
    assert cmd.first("uuid").value == "11111111-2222-3333-4444-555555555555"  # type: ignore[union-attr]
    assert "-daemonize" not in argv and argv.count("-S") == 1
    assert argv[-2:] == ["-incoming", "defer"]
    assert cmd.first("qmp").value == "unix:/run/vm1/.liveupgrade-t0k/qmp.sock,server,wait=off"  # type: ignore[union-attr]
    assert cmd.by_id("chardev", "con").value == (  # type: ignore[union-attr]
        "socket,id=con,path=/run/vm1/.liveupgrade-t0k/console.sock,server=on,wait=off")
    assert cmd.by_id("chardev", "hb").value == "socket,id=hb,path=/run/hb.sock"  # type: ignore[union-attr]
    assert cmd.by_id("chardev", "log").prop("append") == "on"  # type: ignore[union-attr]
    assert cmd.first("pidfile").value == "/run/vm1/.liveupgrade-t0k/pid"  # type: ignore[union-attr]
    assert {(str(r.private), str(r.original)) for r in p.relocations} == {
        ("/run/vm1/.liveupgrade-t0k/qmp.sock", "/run/vm1/qmp.sock"),
        ("/run/vm1/.liveupgrade-t0k/console.sock", "/run/vm1/console.sock"),
        ("/run/vm1/.liveupgrade-t0k/pid", "/run/vm1/pid")}
    assert p.qmp_path == Path("/run/lu/x/qmp.sock") and p.cpr_path is None


def test_a_second_upgrade_reads_the_first_ones_destination() -> None:
    second = plan(plan().argv)
    cmd = CommandLine.parse(second.argv)
    assert [o.value for o in cmd.find("incoming")] == ["defer"]
    assert sum(1 for o in cmd.find("chardev") if o.prop("id") == "liveupgrade-qmp") == 1
    assert qmp_paths(CommandLine.parse(plan().argv))[0] == Path("/run/vm1/qmp.sock")
    assert {str(r.original) for r in second.relocations} >= {"/run/vm1/qmp.sock"}
    assert original_path(Path("/a/.liveupgrade-x/b.sock")) == Path("/a/b.sock")


def test_cpr_transfer_adds_the_cpr_channel() -> None:
    p = plan(mode=Mode.CPR_TRANSFER)
    incoming = [o.value for o in CommandLine.parse(p.argv).find("incoming")]
    assert incoming[0] == "defer"
    assert json.loads(incoming[1] or "") == {"channel-type": "cpr", "addr": {
        "transport": "socket", "type": "unix", "path": "/run/lu/x/cpr.sock"}}


def test_overrides() -> None:
    p = plan(overrides=[Override.parse("disk0.file=/img/copy,1.qcow2")])
    assert "file=/img/copy,,1.qcow2,if=none,id=disk0" in p.argv
    with pytest.raises(Refused, match=r"could change guest-visible"):
        plan(overrides=[Override.parse("pc.ram.size=2G")])
    with pytest.raises(UsageError):
        Override.parse("disk0=x")


def test_proxmox_vm_held_paths() -> None:
    kinds = {(h.kind, str(h.path), h.is_qmp) for h in held_paths(CommandLine.parse(PROXMOX))}
    assert kinds == {("chardev-server", "/var/run/qemu-server/100.qmp", True),
                     ("pidfile", "/var/run/qemu-server/100.pid", False),
                     ("vnc", "/var/run/qemu-server/100.vnc", False)}


def facts(memory_argv, src=V72, dst=V100, tcg=True, caps=("x-ignore-shared", "multifd"),
          exec_blockers=()):
    params = {"mode", "cpr-exec-command"} if dst.at_least(11) else {"mode"}
    return ModeInputs(memory=layout(CommandLine.parse(["q", *memory_argv])), source_version=src,
                      target_version=dst, source_caps=set(caps), target_caps=set(caps),
                      target_params=params if dst.at_least(10) else set(), tcg=tcg,
                      exec_blockers=tuple(exec_blockers))


FILE_RAM = ["-machine", "memory-backend=m", "-object",
            "memory-backend-file,id=m,size=1G,mem-path=/dev/shm/x,share=on"]
MEMFD_RAM = ["-machine", "memory-backend=m,aux-ram-share=on", "-object",
             "memory-backend-memfd,id=m,size=1G"]


def test_mode_choice() -> None:
    assert choose(Mode.AUTO, facts(FILE_RAM))[0] is Mode.SHARED
    assert choose(Mode.AUTO, facts(MEMFD_RAM, V100, V100))[0] is Mode.CPR_TRANSFER
    assert choose(Mode.AUTO, facts([], V100, V100))[0] is Mode.COPY
    assert choose(Mode.AUTO, facts([], V72, V100, tcg=False))[0] is Mode.COPY
    with pytest.raises(Refused, match=r"no upgrade mode is safe.*TCG"):
        choose(Mode.AUTO, facts([], V72, V100))
    with pytest.raises(Refused, match=r"cpr-transfer needs QEMU >= 10.0"):
        choose(Mode.CPR_TRANSFER, facts(FILE_RAM))
    with pytest.raises(Refused, match=r"lost"):  # the < 8.1 memfd + x-ignore-shared bug
        choose(Mode.SHARED, facts(MEMFD_RAM, V72, V100))


def test_cpr_exec_is_only_ever_asked_for() -> None:
    assert choose(Mode.AUTO, facts(MEMFD_RAM, V111, V111))[0] is Mode.CPR_TRANSFER
    assert choose(Mode.CPR_EXEC, facts(MEMFD_RAM, V111, V111))[0] is Mode.CPR_EXEC
    with pytest.raises(Refused, match=r"cpr-exec needs QEMU >= 10.2 on both sides"):
        choose(Mode.CPR_EXEC, facts(MEMFD_RAM, V100, V111))
    with pytest.raises(Refused, match=r"cpr-exec needs share=on"):
        choose(Mode.CPR_EXEC, facts(FILE_RAM[:2], V111, V111))
    with pytest.raises(Refused, match=r"forbids the exec"):
        choose(Mode.CPR_EXEC, facts(MEMFD_RAM, V111, V111, exec_blockers=["forbids the exec"]))


def test_cpr_exec_command_line_and_blockers() -> None:
    source = [*SOURCE, "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
              "-D", "/var/log/vm1.debug", "-S", "-incoming", "defer"]
    fds = SourceFds(taps={"n0": 12})
    argv = build_exec_argv(source, target_binary=Path("/opt/q11"), machine="pc-i440fx-7.2",
                           target_version=V111, state_path=Path("/run/lu/x/cpr-exec.state"),
                           engine_qmp=Path("/run/lu/x/exec-qmp.sock"), fds=fds)
    cmd = CommandLine.parse(argv)
    assert argv[0] == "/opt/q11"
    assert [o.value for o in cmd.find("incoming")] == ["file:/run/lu/x/cpr-exec.state"]
    for gone in ("daemonize", "S", "D"):  # fork (a new PID), paused, a truncated log
        assert cmd.first(gone) is None, gone
    netdev = cmd.by_id("netdev", "n0")
    assert netdev is not None and netdev.prop("fd") == "12" and netdev.prop("ifname") is None
    # The same paths: the new image binds its sockets and writes its pidfile again.
    assert [o.value for o in cmd.find("qmp")] == ["unix:/run/vm1/qmp.sock,server,nowait"]
    assert [o.value for o in cmd.find("pidfile")] == ["/run/vm1/pid"]
    engine = cmd.by_id("chardev", "liveupgrade-qmp")
    assert engine is not None and engine.prop("path") == "/run/lu/x/exec-qmp.sock"
    assert [o.value for o in cmd.find("mon")][-1] == "chardev=liveupgrade-qmp,mode=control"
    # A target with -object monitor-qmp (11.1 calls -mon deprecated) gets that instead, and
    # the next upgrade drops it with the rest of the engine's monitor.
    argv = build_exec_argv(source, target_binary=Path("/opt/q11"), machine="pc-i440fx-7.2",
                           target_version=V111, state_path=Path("/run/lu/x/cpr-exec.state"),
                           engine_qmp=Path("/run/lu/x/exec-qmp.sock"), fds=fds, qmp_object=True)
    assert argv[-4:-2] == ["-object",
                           "monitor-qmp,id=liveupgrade-qmp-mon,chardev=liveupgrade-qmp"]
    again = plan(argv)
    assert not any("liveupgrade-qmp-mon" in a or "exec-qmp" in a for a in again.argv)
    sandboxed = CommandLine.parse([*SOURCE, "-sandbox", "on,spawn=deny"])
    vhost = SourceFds(vhost={"n0"})
    assert any("spawn=deny" in b for b in blockers(sandboxed, SourceFds(), False))
    assert any("vhost-net" in b for b in blockers(CommandLine.parse(SOURCE), vhost, False))
    assert any("libvirt" in b for b in blockers(CommandLine.parse(SOURCE), SourceFds(), True))
    assert blockers(CommandLine.parse(SOURCE), SourceFds(), False) == []
    shut = SourceFds(taps={"n0": 12}, close_on_exec={12})  # it would not survive the exec
    assert any("close-on-exec" in b for b in blockers(CommandLine.parse(SOURCE), shut, False))


def test_memory_layouts(tmp_path: Path) -> None:
    assert layout(CommandLine.parse(["q", "-m", "1G"])).backends[0].backing is Backing.ANONYMOUS
    assert layout(CommandLine.parse(["q", *FILE_RAM])).all_in_shared_files
    unlinked = ["-machine", "memory-backend=m", "-object",
                f"memory-backend-file,id=m,size=1G,mem-path={tmp_path},share=on"]
    lay = layout(CommandLine.parse(["q", *unlinked]))
    assert not lay.all_in_shared_files and lay.all_shared


def test_transfer_settings() -> None:
    f = facts([], V100, V100)
    t = transfer_settings(Mode.COPY, "", f, bandwidth_mib=100, downtime_limit_ms=50)
    assert t.source_caps == {"events": True, "multifd": True}
    assert t.source_params["max-bandwidth"] == 100 * 1024 * 1024
    assert t.source_params["downtime-limit"] == 50
    s = transfer_settings(Mode.SHARED, "", facts(FILE_RAM), bandwidth_mib=None,
                          downtime_limit_ms=100)
    assert s.source_caps["x-ignore-shared"] and s.target_caps["x-ignore-shared"]
    c = transfer_settings(Mode.CPR_TRANSFER, "", facts(MEMFD_RAM, V100, V100),
                          bandwidth_mib=None, downtime_limit_ms=100)
    assert c.source_params["mode"] == "cpr-transfer"


def test_logs_are_appended_to_in_every_spelling() -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-serial", "file:/var/log/vm-serial.log",
            "-chardev", "socket,id=mon0,path=/run/vm/m.sock,logfile=/var/log/m.log",
            "-chardev", '{"backend":"file","id":"f","path":"/var/log/f.log"}']
    cmd = CommandLine.parse(plan(argv).argv)
    serial_dev = cmd.first("serial")
    assert serial_dev is not None and (serial_dev.value or "").startswith("chardev:lu-file-")
    spelled = cmd.by_id("chardev", (serial_dev.value or "")[len("chardev:"):])
    assert spelled is not None and spelled.prop("path") == "/var/log/vm-serial.log"
    assert spelled.prop("append") == "on"
    assert cmd.by_id("chardev", "mon0").prop("logappend") == "on"  # type: ignore[union-attr]
    assert cmd.by_id("chardev", "f").json()["append"] is True  # type: ignore[union-attr]


def test_flags_a_newer_qemu_removed_become_machine_properties() -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-machine", "pc-i440fx-7.2,usb=off", "-no-acpi",
            "-no-hpet"]
    for target, expect_hpet in ((QemuVersion(10, 0), True), (QemuVersion(7, 2), False)):
        p = build_destination(argv, target_binary=Path("/q"), machine="pc-i440fx-7.2",
                              mode=Mode.SHARED, rundir=Path("/r"), target_version=target)
        cmd = CommandLine.parse(p.argv)
        assert not cmd.has("no-acpi") and cmd.machine_prop("acpi") == "off"
        assert cmd.has("no-hpet") is not expect_hpet
        assert (cmd.machine_prop("hpet") == "off") is expect_hpet
