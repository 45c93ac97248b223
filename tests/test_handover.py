"""Unit tests of the pure handover planning: which option becomes which fd."""

from __future__ import annotations

import json
from pathlib import Path

from liveupgrade.cmdline import CommandLine
from liveupgrade.handover import (
    SourceFds,
    rewrite_listeners,
    rewrite_log,
    rewrite_taps,
    rewrite_vnc,
    tap_ifnames,
    vnc_address,
)
from liveupgrade.modes import Mode
from liveupgrade.plan import build_destination
from liveupgrade.preflight import Preflight, check_handover

INFO_NETWORK = """virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56
 \\ net0: index=0,type=tap,ifname=tap7,script=no,downscript=no
virtio-net-pci.1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57
 \\ hostnet1: index=0,type=tap,fd=26
"""


def cmd(*args: str) -> CommandLine:
    return CommandLine.parse(["/usr/bin/qemu-system-x86_64", *args])


def test_info_network_gives_each_tap_netdev_its_interface() -> None:
    assert tap_ifnames(INFO_NETWORK) == {"net0": "tap7"}


def test_an_ifname_tap_becomes_an_fd_tap_without_the_open_only_keys() -> None:
    c = cmd("-netdev", "tap,id=net0,ifname=tap7,script=/etc/qemu-ifup,downscript=no,vhost=on")
    done = rewrite_taps(c, SourceFds(taps={"net0": 11}), {11: 40})
    assert c.first("netdev").value == "tap,id=net0,vhost=on,fd=40"  # type: ignore[union-attr]
    assert done == ["tap netdev net0: source fd(s) 11"]


def test_a_multiqueue_tap_gets_fresh_queues_not_the_sources() -> None:
    c = cmd("-netdev", "tap,id=net0,ifname=tap7,script=no,downscript=no,queues=4")
    facts = SourceFds(mq_taps={"net0": [10, 12, 13, 14]})
    assert facts.at_start(c) == []  # none of the source's queues is taken
    done = rewrite_taps(c, facts, {}, queue_fds={"net0": [40, 41, 42, 43]})
    assert c.first("netdev").value == "tap,id=net0,fds=40:41:42:43"  # type: ignore[union-attr]
    assert "multiqueue, 4 queues" in done[0]
    # A plan shows the source's numbers in their place.
    c = cmd("-netdev", '{"type":"tap","fds":"10:12","id":"net0"}')
    rewrite_taps(c, SourceFds(mq_taps={"net0": [10, 12]}), {})
    assert json.loads(c.first("netdev").value or "") == {  # type: ignore[union-attr]
        "type": "tap", "id": "net0", "fds": "10:12"}


def test_a_vhost_netdev_gets_a_fresh_vhost_fd_never_the_sources() -> None:
    """libvirt passes vhostfd=: the new QEMU gets the engine's fresh /dev/vhost-net (fd 60),
    not the source's 28 (the kernel binds a vhost device to its first owner)."""
    c = cmd("-netdev", '{"type":"tap","fd":"26","vhost":true,"vhostfd":"28","id":"hostnet0"}')
    facts = SourceFds(taps={"hostnet0": 26}, vhost={"hostnet0"})
    assert facts.at_start(c) == [26]  # the source's vhost descriptor is not taken
    done = rewrite_taps(c, facts, {26: 52}, {"hostnet0": 60})
    (second,) = c.find("netdev")
    assert json.loads(second.value or "") == {"type": "tap", "vhost": True, "id": "hostnet0",
                                              "fd": "52", "vhostfd": "60"}
    assert "a fresh /dev/vhost-net" in done[0]


def test_proxmox_vhost_on_keeps_vhost_and_gets_the_fresh_fd() -> None:
    c = cmd("-netdev", "type=tap,id=net0,ifname=tap100i0,script=/var/lib/qemu-server/pve-bridge,"
            "downscript=/var/lib/qemu-server/pve-bridgedown,vhost=on")
    rewrite_taps(c, SourceFds(taps={"net0": 30}, vhost={"net0"}), {30: 41}, {"net0": 42})
    assert c.first("netdev").value == "type=tap,id=net0,vhost=on,fd=41,vhostfd=42"  # type: ignore[union-attr]
    # In a plan (nothing opened yet) the netdev keeps vhost=on alone.
    c = cmd("-netdev", "tap,id=net0,ifname=tap100i0,vhostfd=9,vhost=on")
    rewrite_taps(c, SourceFds(taps={"net0": 30}, vhost={"net0"}), {})
    assert c.first("netdev").value == "tap,id=net0,vhost=on,fd=30"  # type: ignore[union-attr]


def test_a_planned_destination_lists_its_vhost_netdevs(tmp_path: Path) -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-netdev", "tap,id=n0,fd=26,vhost=on,vhostfd=27",
            "-netdev", "tap,id=n1,fd=28", "-device", "virtio-net-pci,netdev=n0"]
    facts = SourceFds(taps={"n0": 26, "n1": 28}, vhost={"n0"})
    plan = build_destination(argv, target_binary=Path("/usr/bin/qemu-new"),
                             machine="pc-i440fx-7.2", mode=Mode.SHARED, rundir=tmp_path,
                             fds=facts, numbers={26: 70, 28: 71}, vhost_fds={"n0": 72})
    assert plan.vhost_netdevs == ["n0"]
    assert "tap,id=n0,vhost=on,fd=70,vhostfd=72" in plan.argv
    assert "tap,id=n1,fd=71" in plan.argv
    assert plan.inherited_fds == [26, 28]


def test_listening_sockets_are_served_from_the_source_fd() -> None:
    c = cmd("-qmp", "unix:/run/vm/qmp.sock,server=on,wait=off",
            "-chardev", "socket,id=con,path=/run/vm/con.sock,server,nowait",
            "-chardev", "socket,id=client,path=/run/vm/other.sock",
            "-serial", "chardev:con")
    facts = SourceFds(unix_listeners={"/run/vm/qmp.sock": 3, "/run/vm/con.sock": 8})
    handled, done = rewrite_listeners(c, facts, {3: 30, 8: 31})
    assert len(handled) == 2 and len(done) == 2
    assert c.argv()[1:] == [
        "-chardev", "socket,id=lu-socket-qmp0,fd=30,server=on,wait=off",
        "-mon", "chardev=lu-socket-qmp0,mode=control",
        "-chardev", "socket,id=con,fd=31,server=on,wait=off",
        "-chardev", "socket,id=client,path=/run/vm/other.sock",  # a client: untouched
        "-serial", "chardev:con"]
    assert facts.at_start(cmd("-qmp", "unix:/run/vm/qmp.sock,server=on")) == [3]


def test_vnc_starts_privately_and_remembers_its_address() -> None:
    c = cmd("-vnc", ":1,password=on,to=5")
    vnc = rewrite_vnc(c, SourceFds(tcp_listeners={5901: [12, 13]}), Path("/run/lu/vnc.sock"))
    assert c.first("vnc").value == "unix:/run/lu/vnc.sock,password=on"  # type: ignore[union-attr]
    assert vnc is not None and vnc.source_fds == (12, 13)
    assert vnc_address("127.0.0.1:3")[:2] == ({"type": "inet", "host": "127.0.0.1",
                                                 "port": "5903"}, 5903)
    assert rewrite_vnc(cmd("-vnc", "localhost:0,reverse=on"), SourceFds(), Path("/x")) is None


def test_the_debug_log_is_appended_to_through_stderr_not_truncated() -> None:
    c = cmd("-D", "/var/log/vm.log", "-d", "guest_errors")
    assert rewrite_log(c) == Path("/var/log/vm.log") and not c.has("D")


def test_a_planned_destination_hands_over_sockets_and_relocates_only_the_rest() -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-qmp", "unix:/run/vm/qmp.sock,server=on,wait=off",
            "-pidfile", "/run/vm/pid", "-netdev", "tap,id=n0,ifname=tap0,script=no",
            "-chardev", "socket,id=ga,path=/run/vm/ga.sock,server=on,wait=off"]
    facts = SourceFds(taps={"n0": 20}, unix_listeners={"/run/vm/qmp.sock": 3})
    plan = build_destination(argv, target_binary=Path("/new/qemu"), machine="pc-q35-7.2",
                             mode=Mode.SHARED, rundir=Path("/run/lu/x"), token="t",
                             fds=facts)
    assert plan.inherited_fds == [3, 20] and plan.tap_fds == [20]
    assert sorted(str(r.original) for r in plan.relocations) == ["/run/vm/ga.sock", "/run/vm/pid"]
    assert "tap,id=n0,fd=20" in plan.argv


def test_preflight_refuses_what_cannot_be_handed_over() -> None:
    c = cmd("-net", "tap,ifname=tap0", "-spice", "port=5930")
    plan = build_destination(c.argv(), target_binary=Path("/q"), machine="pc", mode=Mode.SHARED,
                             rundir=Path("/r"), fds=SourceFds(taps={"x": 5}))
    pf = Preflight()
    check_handover(pf, c, SourceFds(tap_problems={"n1": "no descriptor"}), plan,
                   "cannot take fd 0 from PID 1: Operation not permitted")
    (check,) = pf.checks
    assert not check.ok and not check.forceable
    for text in ("legacy '-net tap'", "tap netdev n1: no descriptor", "Operation not permitted",
                 "SPICE"):
        assert text in check.detail
