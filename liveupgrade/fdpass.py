"""Duplicate a file descriptor out of another process (pidfd_getfd, Linux >= 5.6).

The new QEMU must use the very same tap device queue and listening sockets
the old one holds: a tap attaches to one descriptor, and a listening socket
re-created at the same address leaves a gap in which clients are refused.
pidfd_getfd gives the engine a duplicate of the source's descriptor, which it
then passes to the destination at start (pass_fds) or over QMP (SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from liveupgrade.errors import DestinationFailed, Refused

SYS_PIDFD_GETFD = 438  # same number on every architecture since Linux 5.6
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class FdAccessError(Refused):
    """The source's descriptors cannot be taken (permission, old kernel, gone)."""


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    result = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def take_fds(pid: int, fds: list[int]) -> dict[int, int]:
    """Duplicate each of the process's fds into ours: {their fd: our fd}.

    Our copies are close-on-exec (the kernel sets it); pass_fds clears that
    for the child that should inherit them. On failure nothing stays open.
    """
    taken: dict[int, int] = {}
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        raise FdAccessError(f"cannot open a pidfd for PID {pid}: {e.strerror}",
                            _access_fix(e.errno)) from e
    try:
        for fd in fds:
            try:
                taken[fd] = _pidfd_getfd(pidfd, fd)
            except OSError as e:
                raise FdAccessError(f"cannot take fd {fd} from PID {pid} (pidfd_getfd): "
                                    f"{e.strerror}", _access_fix(e.errno)) from e
    except BaseException:
        close_all(taken.values())
        raise
    finally:
        os.close(pidfd)
    return taken


def _access_fix(err: int | None) -> str:
    if err in (errno.EPERM, errno.EACCES):
        return ("run liveupgrade as root (pidfd_getfd needs ptrace rights over the QEMU "
                "process; check kernel.yama.ptrace_scope and any LSM confinement)")
    if err == errno.ENOSYS:
        return "the kernel lacks pidfd_getfd (Linux >= 5.6 is needed)"
    return "check that the QEMU process is still running"


def open_vhost_net(pid: int, netdevs: list[str]) -> dict[str, int]:
    """A fresh /dev/vhost-net for each vhost netdev, as the source sees the device
    (through its root: libvirt gives each domain a private /dev). Opened here, as root,
    like libvirt does for an unprivileged QEMU; the new QEMU becomes its owner."""
    opened: dict[str, int] = {}
    try:
        for ident in netdevs:
            opened[ident] = os.open(f"/proc/{pid}/root/dev/vhost-net",
                                    os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        close_all(opened.values())
        raise DestinationFailed(
            f"cannot open /dev/vhost-net for the new QEMU's netdev(s) "
            f"{', '.join(netdevs)}: {e.strerror}",
            "run liveupgrade as root on a host with the vhost_net module loaded") from e
    return opened


TUNSETIFF, TUNGETIFF = 0x400454CA, 0x800454D2
IFF_PERSIST = 0x0800
CLONE_NEWNET = 0x40000000


def _in_netns_of(pid: int, fn: Callable[[], T]) -> T:
    """Call fn in a thread of its own that has joined pid's network namespace (setns(2)
    moves only the calling thread, which then ends: no other thread ever changes
    namespace)."""
    box: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            ns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(ns, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into PID {pid}'s network namespace: "
                                       f"{os.strerror(err)}")
            finally:
                os.close(ns)
            box.append(fn())
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run, name=f"netns-{pid}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return box[0]


def open_tap_queues(pid: int, source_fd: int, count: int) -> list[int]:
    """`count` fresh queues on the multiqueue tap behind the source's fd `source_fd`.

    A multiqueue tap accepts more queues (each an open /dev/net/tun attached by
    name); the new QEMU gets its own, so the source's queues, which its guest is
    using, are never detached under it (a starting QEMU detaches the queues its
    guest does not use yet). The device's flags are read from the source's queue
    and given back as they are: TUNSETIFF on an existing tap replaces its feature
    flags (vnet header, multiqueue) with the caller's. Opened as root in the
    source's network namespace, through its /dev (its mount namespace).
    """
    (own,) = take_fds(pid, [source_fd]).values()
    try:
        ifr = bytearray(40)
        fcntl.ioctl(own, TUNGETIFF, ifr)
    finally:
        os.close(own)
    name, flags = struct.unpack_from("16sH", ifr)
    request = struct.pack("16sH", name, flags & ~IFF_PERSIST)

    def open_all() -> list[int]:
        opened: list[int] = []
        try:
            for _ in range(count):
                fd = os.open(f"/proc/{pid}/root/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                opened.append(fd)
                fcntl.ioctl(fd, TUNSETIFF, request)
        except BaseException:
            close_all(opened)
            raise
        return opened

    try:
        return _in_netns_of(pid, open_all)
    except OSError as e:
        raise DestinationFailed(
            f"cannot open {count} new queue(s) on tap {name.rstrip(bytes(1)).decode()}: "
            f"{e.strerror or e}", "run liveupgrade as root") from e


def close_all(fds: object) -> None:
    for fd in list(fds):  # type: ignore[call-overload]
        with contextlib.suppress(OSError):
            os.close(fd)


def can_take_fds(pid: int) -> str | None:
    """None if this process may duplicate pid's descriptors, else the reason.

    Tried for real on one descriptor the process has open (and closed again):
    ptrace rules, LSMs and kernel support all show in the answer.
    """
    try:
        some_fd = min(int(name) for name in os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError) as e:
        return f"cannot list the descriptors of PID {pid}: {e}"
    try:
        taken = take_fds(pid, [some_fd])
    except FdAccessError as e:
        return f"{e} (fix: {e.fix})"
    close_all(taken.values())
    return None


@dataclass(frozen=True)
class FdFacts:
    """What /proc tells about one open descriptor of a process."""

    fd: int
    target: str  # readlink of /proc/PID/fd/N: "/dev/net/tun", "socket:[123]", ...
    tun_ifname: str | None  # the tap/tun interface a /dev/net/tun fd is attached to
    flags: int | None = None  # its open flags (fdinfo; read for /dev/net/tun fds only)

    @property
    def close_on_exec(self) -> bool:
        """Whether an exec would close it (unknown counts as closed)."""
        return self.flags is None or bool(self.flags & os.O_CLOEXEC)

    @property
    def socket_inode(self) -> int | None:
        """The inode of a socket (as /proc/PID/net/unix lists it), from the link itself."""
        return _socket_inode(self.target)


_IFF = re.compile(r"^iff:\s*(\S+)", re.MULTILINE)
_FLAGS = re.compile(r"^flags:\s*([0-7]+)", re.MULTILINE)


def open_fds(pid: int) -> list[FdFacts]:
    """Every descriptor of the process; for /dev/net/tun fds also their tap interface and
    open flags (one read of fdinfo)."""
    found = []
    base = Path(f"/proc/{pid}")
    for entry in (base / "fd").iterdir():
        with contextlib.suppress(OSError):
            fd = int(entry.name)
            target = os.readlink(entry)
            ifname = flags = None
            if target == "/dev/net/tun":
                info = (base / "fdinfo" / entry.name).read_text()
                iff, mode = _IFF.search(info), _FLAGS.search(info)
                ifname = iff.group(1) if iff else None
                flags = int(mode.group(1), 8) if mode else None
            found.append(FdFacts(fd, target, ifname, flags))
    return sorted(found, key=lambda f: f.fd)


_SOCKET = re.compile(r"^socket:\[(\d+)\]$")


def _socket_inode(target: str) -> int | None:
    match = _SOCKET.match(target)
    return int(match.group(1)) if match else None


def socket_inode(pid: int, fd: int) -> int | None:
    """The inode of a socket fd (as /proc/PID/net/unix lists it), or None."""
    with contextlib.suppress(OSError):
        return _socket_inode(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return None


TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8


def vnet_header_sizes(pid: int, fds: list[int]) -> dict[int, int]:
    """The virtio-net header size of the taps behind pid's fds {fd: size}."""
    taken = take_fds(pid, fds)
    try:
        return {fd: VnetHeaderGuard.get(own) for fd, own in taken.items()}
    finally:
        close_all(taken.values())


def restore_vnet_header_sizes(pid: int, sizes: dict[int, int]) -> list[str]:
    """Put the taps behind pid's fds back to the header sizes noted before a destination
    started (it resets them, and only the engine's guard, gone with the engine, puts
    them back); returns what was changed."""
    taken = take_fds(pid, list(sizes))
    done = []
    try:
        for fd, own in taken.items():
            now = VnetHeaderGuard.get(own)
            if now != sizes[fd]:
                fcntl.ioctl(own, TUNSETVNETHDRSZ, sizes[fd].to_bytes(4, "little"))
                done.append(f"tap fd {fd}: virtio-net header size {now} -> {sizes[fd]}")
    finally:
        close_all(taken.values())
    return done


class VnetHeaderGuard:
    """Hold a shared tap's virtio-net header size at the source's value.

    The header size is a property of the tap device, not of a descriptor,
    and a QEMU that initialises a tap netdev resets it (to 10 bytes), while
    the source still runs its guest with 12 (VIRTIO_F_VERSION_1 or mergeable
    rx buffers): every frame in both directions would be misparsed until
    switchover. So from the destination's start, the engine puts the
    source's size back the moment it changes. The destination sets the same
    size itself when it loads the NIC's state, so the guard runs only until
    the destination's monitor answers (its netdevs are set up by then).
    """

    POLL_INTERVAL = 0.0005

    def __init__(self, fds: list[int]):
        self.fds = [os.dup(fd) for fd in fds]
        self.sizes = {fd: self.get(fd) for fd in self.fds}

    @staticmethod
    def get(fd: int) -> int:
        buf = bytearray(4)
        fcntl.ioctl(fd, TUNGETVNETHDRSZ, buf)
        return int.from_bytes(buf, "little")

    def enforce(self) -> None:
        for fd, size in self.sizes.items():
            with contextlib.suppress(OSError):
                if self.get(fd) != size:
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, size.to_bytes(4, "little"))

    async def hold(self) -> None:
        """Enforce until cancelled."""
        try:
            while True:
                self.enforce()
                await asyncio.sleep(self.POLL_INTERVAL)
        finally:
            self.enforce()

    def close(self) -> None:
        close_all(self.fds)
        self.fds = []
