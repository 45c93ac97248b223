"""Unit tests: QEMU command-line model, round trips and rewrites (no QEMU)."""

from __future__ import annotations

import json

import pytest

from liveupgrade.cmdline import CommandLine, CommandLineError, KeyVals, split_keyvals

# As libvirt 9.0 writes them (trimmed), with JSON -object/-device/-blockdev and fd= sockets.
LIBVIRT = [
    "/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on", "-S",
    "-object", '{"qom-type":"secret","id":"masterKey0","format":"raw",'
               '"file":"/var/lib/libvirt/qemu/domain-1-web1/master-key.aes"}',
    "-machine", "pc-q35-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
    "-accel", "kvm", "-cpu", "host,migratable=on", "-m", "1024",
    "-object", '{"qom-type":"memory-backend-file","id":"pc.ram",'
               '"mem-path":"/var/lib/libvirt/qemu/ram/1-web1/pc.ram","share":true,'
               '"x-use-canonical-path-for-ramblock-id":false,"size":1073741824}',
    "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
    "-uuid", "8f0c2b4e-2d4f-4f55-9b7e-3c1b8d1d0a11", "-no-user-config", "-nodefaults",
    "-chardev", "socket,id=charmonitor,fd=31,server=on,wait=off",
    "-mon", "chardev=charmonitor,id=monitor,mode=control",
    "-rtc", "base=utc,driftfix=slew", "-no-shutdown", "-boot", "strict=on",
    "-blockdev", '{"driver":"file","filename":"/var/lib/libvirt/images/web1.qcow2",'
                 '"node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}',
    "-device", '{"driver":"virtio-blk-pci","bus":"pci.3","addr":"0x0",'
               '"drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}',
    "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    "-msg", "timestamp=on",
]

# As Proxmox VE writes them (trimmed): legacy flag spellings, ,, in a path.
PROXMOX = [
    "/usr/bin/kvm", "-id", "100", "-name", "vm100,debug-threads=on", "-no-shutdown",
    "-chardev", "socket,id=qmp,path=/var/run/qemu-server/100.qmp,server=on,wait=off",
    "-mon", "chardev=qmp,mode=control",
    "-chardev", "socket,id=qmp-event,path=/var/run/qmeventd.sock,reconnect=5",
    "-mon", "chardev=qmp-event,mode=control",
    "-pidfile", "/var/run/qemu-server/100.pid", "-daemonize",
    "-smbios", "type=1,uuid=3f1b3c1e-6e8a-4d1c-8e7e-1b2b3c4d5e6f",
    "-smp", "2,sockets=1,cores=2,maxcpus=2", "-nodefaults", "-boot",
    "menu=on,strict=on,reboot-timeout=1000,splash=/usr/share/qemu-server/bootsplash.jpg",
    "-vnc", "unix:/var/run/qemu-server/100.vnc,password=on", "-cpu", "kvm64,enforce,+kvm_pv_eoi",
    "-m", "2048", "-drive", "file=/mnt/pve/a,,b/vm-100-disk-0.raw,if=none,id=drive-scsi0,"
    "format=raw,cache=none,aio=io_uring,detect-zeroes=on",
    "-machine", "type=pc-i440fx-7.2+pve0", "-enable-kvm",
]

QEMU_DOCS = [
    "qemu-system-x86_64", "-M", "pc", "-m", "size=1G,slots=2,maxmem=4G", "-nographic",
    "-qmp", "unix:/tmp/q.sock,server,nowait", "-serial", "mon:stdio", "disk.img",
    "--accel", "tcg,thread=multi",
]


@pytest.mark.parametrize("argv", [LIBVIRT, PROXMOX, QEMU_DOCS], ids=["libvirt", "proxmox", "docs"])
def test_round_trip_is_byte_for_byte(argv: list[str]) -> None:
    assert CommandLine.parse(argv).argv() == argv


@pytest.mark.parametrize("argv", [LIBVIRT, PROXMOX, QEMU_DOCS], ids=["libvirt", "proxmox", "docs"])
def test_every_keyval_argument_renders_back_identically(argv: list[str]) -> None:
    for opt in CommandLine.parse(argv).options:
        if opt.value is not None and not opt.is_json:
            assert opt.keyvals().render() == opt.value


def test_double_comma_escapes_a_comma() -> None:
    assert split_keyvals("file=/a,,b/c.raw,if=none") == ["file=/a,b/c.raw", "if=none"]
    kv = KeyVals.parse("file=/a,,b/c.raw,if=none")
    assert kv.get("file") == "/a,b/c.raw"
    kv.set("file", "/x,y")
    assert kv.render() == "file=/x,,y,if=none"


def test_props_from_keyval_json_and_implied_keys() -> None:
    cmd = CommandLine.parse(LIBVIRT)
    assert cmd.machine_prop("type") == "pc-q35-7.2"
    assert cmd.machine_prop("memory-backend") == "pc.ram"
    ram = cmd.by_id("object", "pc.ram")
    assert ram is not None and ram.prop("share") == "on" and ram.prop("size") == "1073741824"
    disk = cmd.by_id("blockdev", "libvirt-1-storage")
    assert disk is not None and disk.prop("filename") == "/var/lib/libvirt/images/web1.qcow2"
    assert CommandLine.parse(PROXMOX).machine_prop("type") == "pc-i440fx-7.2+pve0"
    assert CommandLine.parse(QEMU_DOCS).first("m").prop("size") == "1G"  # type: ignore[union-attr]


def test_set_prop_keeps_json_types_and_everything_else() -> None:
    cmd = CommandLine.parse(LIBVIRT)
    disk = cmd.by_id("blockdev", "libvirt-1-storage")
    assert disk is not None
    disk.set_prop("filename", "/srv/copy.qcow2")
    data = json.loads(disk.value or "")
    assert data["filename"] == "/srv/copy.qcow2" and data["auto-read-only"] is True
    machine = cmd.first("machine")
    assert machine is not None
    machine.set_prop("type", "pc-q35-7.2")
    assert machine.value == "pc-q35-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram"


def test_flags_positionals_and_errors() -> None:
    cmd = CommandLine.parse(QEMU_DOCS)
    assert [o.name for o in cmd.options].count(None) == 1  # disk.img
    assert cmd.has("nographic") and cmd.first("accel").spelling == "--"  # type: ignore[union-attr]
    with pytest.raises(CommandLineError, match="needs an argument"):
        CommandLine.parse(["qemu-system-x86_64", "-m"])
    with pytest.raises(CommandLineError, match="invalid JSON"):
        CommandLine.parse(["q", "-object", "{nope"]).options[0].json()
