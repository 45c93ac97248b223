"""Which of the source's descriptors the destination takes over, and how.

A running VM's NICs, consoles and displays are file descriptors that cannot
simply be opened twice: a (non-multiqueue) tap attaches to one descriptor,
and a listening socket re-created at its address leaves a gap in which
clients are refused. So the destination is given the source's own
descriptors, duplicated with pidfd_getfd:

- single-queue tap netdevs become ``fd=`` netdevs; a multiqueue tap gets
  fresh queues on the same device (``fds=``, fdpass.open_tap_queues): its
  queues cannot be shared, since a starting QEMU detaches the ones its guest
  does not use yet, under the running source. A netdev that uses vhost-net gets a *fresh*
  /dev/vhost-net, opened by the engine (``vhostfd=``), never the source's: a
  vhost device belongs to the process that issued VHOST_SET_OWNER, and the
  kernel answers EBUSY to a second owner (drivers/vhost/vhost.c,
  vhost_dev_set_owner), so the source's device is of no use to the new QEMU;
- listening unix sockets of chardevs, QMP, HMP and serial become
  ``-chardev socket,fd=N,server=on`` on the very same socket;
- a VNC display starts on a private unix socket and, after switchover, is
  switched with ``display-update`` to the source's listening socket(s).

`SourceFds` holds the facts (gathered from /proc and ``info network``);
the `rewrite_*` functions are pure and map the source's fd numbers through
`numbers` (identity in a plan; the engine's duplicates at start).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liveupgrade.cmdline import CommandLine, KeyVals, Option
from liveupgrade.endpoints import (
    TRUE_WORDS,
    HeldPath,
    control_chardevs,
    is_socket_server,
    kv_flag,
    original_path,
    spec_unix_path,
    without_waiting,
)
from liveupgrade.fdpass import open_fds, socket_inode

# A tap netdev passed by fd accepts none of these (QEMU: "... are invalid with fd=").
TAP_OPEN_KEYS = ("ifname", "script", "downscript", "vnet_hdr", "helper", "queues", "br",
                 "fd", "fds", "vhostfd", "vhostfds")
VNC_BASE_PORT = 5900
VNC_ADDRESS_KEYS = ("to", "ipv4", "ipv6")
# Chardevs made from "-qmp unix:PATH,server" and friends, so they can take an fd.
HANDOVER_CHARDEV_PREFIX = "lu-socket-"


@dataclass
class SourceFds:
    """The source's descriptors that an upgrade hands over, by what uses them."""

    taps: dict[str, int] = field(default_factory=dict)  # netdev id -> its tap fd
    mq_taps: dict[str, list[int]] = field(default_factory=dict)  # multiqueue: its queue fds
    close_on_exec: set[int] = field(default_factory=set)  # tap fds an exec would close
    vhost: set[str] = field(default_factory=set)  # tap netdevs that use vhost-net
    tap_problems: dict[str, str] = field(default_factory=dict)  # netdev id -> why not
    unix_listeners: dict[str, int] = field(default_factory=dict)  # bound path -> fd
    tcp_listeners: dict[int, list[int]] = field(default_factory=dict)  # port -> fds

    def at_start(self, cmd: CommandLine) -> list[int]:
        """The fds the destination needs when it starts (taps, chardev listeners)."""
        fds = list(self.taps.values())
        for opt in cmd.options:
            fd = listener_fd(opt, self)
            if fd is not None:
                fds.append(fd)
        return sorted(set(fds))


def is_tap(opt: Option) -> bool:
    return opt.name in ("netdev", "nic") and opt.prop("type") == "tap"


def _fd_list(value: str | None) -> list[int]:
    if not value:
        return []
    return [int(part) for part in value.split(":") if part.strip().isdigit()]


# "info network" lines: " \ n0: index=0,type=tap,ifname=tap0,script=no,downscript=no"
_INFO_TAP = re.compile(r"^[\s\\]*(\S+): index=\d+,type=tap,(.*)$", re.MULTILINE)


def tap_ifnames(info_network: str) -> dict[str, str]:
    """netdev id -> tap interface, from HMP `info network`."""
    found = {}
    for name, rest in _INFO_TAP.findall(info_network):
        kv = KeyVals.parse(rest)
        if kv.get("ifname"):
            found[name] = kv.get("ifname") or ""
    return found


def gather(pid: int, cmd: CommandLine, info_network: str) -> SourceFds:
    """Read the source's descriptors from /proc: taps by interface, listening sockets."""
    facts = SourceFds()
    fds = open_fds(pid)
    by_ifname: dict[str, list[int]] = {}
    for f in fds:
        if f.tun_ifname:
            by_ifname.setdefault(f.tun_ifname, []).append(f.fd)
    facts.close_on_exec = {f.fd for f in fds if f.target == "/dev/net/tun" and f.close_on_exec}
    ifnames = tap_ifnames(info_network)
    for index, opt in enumerate(o for o in cmd.options if is_tap(o)):
        ident = opt.prop("id") or f"__org.qemu.nic{index}"
        given = _fd_list(opt.prop("fd")) or _fd_list(opt.prop("fds"))
        if not given and ident in ifnames:
            given = by_ifname.get(ifnames[ident], [])
        if len(given) > 1 and uses_vhost(opt):
            facts.tap_problems[ident] = (
                f"a multiqueue tap ({len(given)} queues) with vhost-net: not supported (fresh "
                "queues would each need a fresh vhost device; not testable on a host without "
                "/dev/vhost-net)")
        elif len(given) > 1:
            facts.mq_taps[ident] = given
        elif given:
            facts.taps[ident] = given[0]
        else:
            facts.tap_problems[ident] = (
                f"no /dev/net/tun descriptor of interface {ifnames.get(ident, '?')} "
                "found in the process")
        if ident in facts.taps and uses_vhost(opt):
            facts.vhost.add(ident)
    # A vhost device in the fd table, and one tap that says nothing of vhost (vhost=on is
    # the default of a manager's own wrapper, e.g.): that tap uses it.
    if len(facts.taps) == 1 and not facts.vhost and any(f.target == "/dev/vhost-net"
                                                         for f in fds):
        facts.vhost.update(facts.taps)
    inode_fd = {f.socket_inode: f.fd for f in fds if f.socket_inode is not None}
    for inode, path in _unix_listening(pid):
        if inode in inode_fd:
            facts.unix_listeners[path] = inode_fd[inode]
    # /proc/PID/net/tcp walks the kernel's whole socket hash (~10 ms here):
    # read it only when a TCP display needs a listener found.
    if any(o.name == "vnc" and o.value and not o.value.startswith(("unix:", "none"))
           for o in cmd.options):
        for inode, port in _tcp_listening(pid):
            if inode in inode_fd:
                facts.tcp_listeners.setdefault(port, []).append(inode_fd[inode])
    return facts


def fd_qmp_paths(pid: int, cmd: CommandLine) -> list[Path]:
    """Where the QMP sockets passed as fd=N (by libvirt, or by an earlier upgrade) listen."""
    listening = dict(_unix_listening(pid))
    found = []
    for opt in cmd.find("chardev"):
        fd = opt.prop("fd")
        if opt.prop("id") in control_chardevs(cmd) and fd is not None and fd.isdigit():
            inode = socket_inode(pid, int(fd))
            if inode in listening:
                found.append(original_path(Path(listening[inode])))
    return found


SO_ACCEPTCON = 0x10000
TCP_LISTEN = "0A"


def _unix_listening(pid: int) -> list[tuple[int, str]]:
    """(inode, path) of listening unix sockets in the process's network namespace."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and int(parts[3], 16) & SO_ACCEPTCON:
                found.append((int(parts[6]), parts[7]))
    return found


def _tcp_listening(pid: int) -> list[tuple[int, int]]:
    """(inode, port) of listening TCP sockets in the process's network namespace."""
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) >= 10 and parts[3] == TCP_LISTEN:
                    found.append((int(parts[9]), int(parts[1].rsplit(":", 1)[1], 16)))
    return found


# ---- pure rewriting of the destination's command line --------------------------------

def uses_vhost(opt: Option) -> bool:
    """Whether a tap netdev asks for vhost-net (vhost=on, or a vhost descriptor given)."""
    vhost = opt.prop("vhost")
    return (vhost is not None and vhost.lower() in TRUE_WORDS) or bool(
        opt.prop("vhostfd") or opt.prop("vhostfds"))


def rewrite_taps(cmd: CommandLine, facts: SourceFds, numbers: Mapping[int, int],
                 vhost_fds: Mapping[str, int] | None = None,
                 queue_fds: Mapping[str, list[int]] | None = None) -> list[str]:
    """Turn every tap netdev into one on given descriptors; returns what was done.

    A single-queue tap runs on the source's own descriptor (renumbered by
    `numbers`). A vhost netdev gets `vhost_fds[id]` (a fresh /dev/vhost-net the
    engine opened) as its vhostfd; in a plan, before any is opened, it keeps
    vhost=on alone. A multiqueue tap gets `queue_fds[id]`: fresh queues on the
    same device (fdpass.open_tap_queues), or for cpr-exec the source's own; in a
    plan, the source's numbers stand in for them.
    """
    done = []
    for index, opt in enumerate(o for o in cmd.options if is_tap(o)):
        ident = opt.prop("id") or f"__org.qemu.nic{index}"
        fd = facts.taps.get(ident)
        if ident in facts.mq_taps:
            queues = (queue_fds or {}).get(ident) or facts.mq_taps[ident]
            _set_tap(opt, {"fds": ":".join(map(str, queues))})
            done.append(f"tap netdev {ident}: multiqueue, {len(queues)} queues: fds "
                        f"{':'.join(map(str, queues))} on the same tap (for an upgrade, fresh "
                        "queues opened by liveupgrade: the source keeps its own)")
            continue
        if fd is None:
            continue
        changes: dict[str, Any] = {"fd": str(numbers.get(fd, fd))}
        note = ""
        if ident in facts.vhost:
            changes["vhost"] = True if opt.is_json else "on"
            if vhost_fds and ident in vhost_fds:
                changes["vhostfd"] = str(vhost_fds[ident])
            note = ("; vhost-net: a fresh /dev/vhost-net opened by liveupgrade (the "
                    "source's stays its own: the kernel lets only its owner use it)")
        _set_tap(opt, changes)
        done.append(f"tap netdev {ident}: source fd(s) {fd}{note}")
    return done


def _set_tap(opt: Option, changes: dict[str, Any]) -> None:
    """A tap netdev on descriptors: how it opened its tap goes, `changes` come in."""
    if opt.is_json:
        data = {k: v for k, v in opt.json().items() if k not in TAP_OPEN_KEYS}
        data.update(changes)
        opt.value = json.dumps(data, separators=(",", ":"))
    else:
        kv = opt.keyvals()
        for key in TAP_OPEN_KEYS:
            kv.remove(key)
        for key, value in changes.items():
            kv.set(key, str(value))
        opt.value = kv.render()


def listener_fd(opt: Option, facts: SourceFds) -> int | None:
    """The source's listening fd behind a chardev/monitor option, if it has one."""
    if opt.value is None:
        return None
    if opt.name == "chardev":
        if not is_socket_server(opt):
            return None
        fd = opt.prop("fd")
        if fd is not None and fd.isdigit():
            return int(fd)
        path = opt.prop("path")
        return _bound(path, facts) if path else None
    if opt.name in ("qmp", "qmp-pretty", "monitor", "serial") and not opt.is_json:
        path = spec_unix_path(opt.value)
        if path and kv_flag(opt.keyvals(), "server"):
            return _bound(path, facts)
    return None


def _bound(path: str, facts: SourceFds) -> int | None:
    for candidate in (path, str(original_path(Path(path)))):
        if candidate in facts.unix_listeners:
            return facts.unix_listeners[candidate]
    return None


def rewrite_listeners(cmd: CommandLine, facts: SourceFds,
                      numbers: Mapping[int, int]) -> tuple[set[int], list[str]]:
    """Serve every listening chardev/monitor socket from the source's own listening fd.

    Returns the ids of the options handed over (by id(Option)) and what was done.
    `-qmp/-monitor/-serial unix:PATH,server` become a socket chardev plus the
    `-mon`/`-serial chardev:` that uses it, since only -chardev takes an fd.
    """
    handled: set[int] = set()
    done = []
    out: list[Option] = []
    for count, opt in enumerate(cmd.options):
        fd = listener_fd(opt, facts)
        if fd is None:
            out.append(opt)
            continue
        number = numbers.get(fd, fd)
        if opt.name == "chardev":
            ident = opt.prop("id") or ""
            if opt.is_json:
                data = {k: v for k, v in opt.json().items() if k != "path"}
                data.update(fd=str(number), server=True, wait=False)
                opt.value = json.dumps(data, separators=(",", ":"))
            else:
                kv = opt.keyvals()
                kv.remove("path")
                kv.items = [(k, v) for k, v in kv.items if not (k is None and v == "server")]
                kv.set("fd", str(number))
                kv.set("server", "on")
                opt.value = without_waiting(kv)
            out.append(opt)
        else:
            ident = f"{HANDOVER_CHARDEV_PREFIX}{opt.name}{count}"
            out.append(Option("chardev", f"socket,id={ident},fd={number},server=on,wait=off"))
            if opt.name == "serial":
                out.append(Option("serial", f"chardev:{ident}"))
            else:
                mode = "readline" if opt.name == "monitor" else "control"
                pretty = ",pretty=on" if opt.name == "qmp-pretty" else ""
                out.append(Option("mon", f"chardev={ident},mode={mode}{pretty}"))
        handled.add(id(opt))
        done.append(f"listening socket of -{opt.name} {ident}: source fd {fd}")
    cmd.options = out
    return handled, done


@dataclass(frozen=True)
class VncHandover:
    """The source's VNC display, taken over after switchover with display-update."""

    display: str  # the source's -vnc argument
    source_fds: tuple[int, ...]  # its listening sockets, if found
    address: dict[str, Any]  # SocketAddress to rebind if the fds cannot be taken


def vnc_address(display: str) -> tuple[dict[str, Any], int | None, str | None]:
    """(SocketAddress, TCP port or None, unix path or None) of a -vnc argument."""
    head = KeyVals.parse(display).items[0][1] or ""
    if head.startswith("unix:"):
        return {"type": "unix", "path": head[5:]}, None, head[5:]
    host, _, number = head.rpartition(":")
    port = VNC_BASE_PORT + int(number)
    return {"type": "inet", "host": host.strip("[]") or "0.0.0.0", "port": str(port)}, port, None


def rewrite_vnc(cmd: CommandLine, facts: SourceFds, private: Path) -> VncHandover | None:
    """Start the destination's VNC on a private unix socket; plan the takeover."""
    opt = cmd.first("vnc")
    if opt is None or opt.value is None or opt.value.startswith("none"):
        return None
    display = opt.value
    kv = KeyVals.parse(display)
    if kv_flag(kv, "reverse"):
        return None  # the VM connects out to a viewer: nothing listens
    address, port, path = vnc_address(display)
    if port is not None:
        fds = tuple(facts.tcp_listeners.get(port, []))
    else:
        fd = _bound(path or "", facts)
        fds = (fd,) if fd is not None else ()
        address = {"type": "unix", "path": str(original_path(Path(path or "")))}
    kv.items[0] = (None, f"unix:{private}")
    for key in VNC_ADDRESS_KEYS:
        kv.remove(key)
    opt.value = kv.render()
    return VncHandover(display, fds, address)


def rewrite_log(cmd: CommandLine) -> Path | None:
    """Drop -D: QEMU truncates that file at start (and 10.0 on `logfile` too).

    The destination's stderr appends to the file instead, and QEMU logs to
    stderr when -D is absent, so nothing the source wrote is lost.
    """
    opt = cmd.first("D")
    if opt is None or opt.value is None:
        return None
    cmd.remove("D")
    return original_path(Path(opt.value))


def held_elsewhere(held: list[HeldPath], handled: set[int]) -> list[HeldPath]:
    """The held paths whose option was not handed over by fd (they are relocated)."""
    return [h for h in held if id(h.option) not in handled and h.kind != "vnc"]


def client_sockets(cmd: CommandLine) -> list[str]:
    """What happens to each socket chardev that connects out (no server=on): the new
    QEMU, started from the same command line, connects to the same listener when it
    starts, while the old one is still connected; the old connection closes when the
    old QEMU is killed after switchover. A QMP client of a control monitor on it (e.g.
    Proxmox's qmeventd) sees the old QEMU's STOP, the new connection's RESUME, and no
    SHUTDOWN (tests/test_client_sockets.py)."""
    notes = []
    for opt in cmd.find("chardev"):
        if opt.prop("backend") != "socket" or is_socket_server(opt):
            continue
        ident = opt.prop("id")
        where = opt.prop("path") or f"{opt.prop('host')}:{opt.prop('port')}"
        control = any(o.name == "mon" and o.prop("chardev") == ident
                      and o.prop("mode") == "control" for o in cmd.options)
        what = "QMP monitor (client)" if control else "socket (client)"
        notes.append(f"chardev {ident}: {what} to {where}: the new QEMU connects there at "
                     "start, beside the old one; the old connection closes after switchover")
    return notes
