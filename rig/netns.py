"""A private network for a test guest: a network namespace with a tap device.

The tests make their own namespace so that nothing on the host's network is
touched and addresses never collide: the tap lives in the namespace with the
host side's address, QEMU runs in it (it opens the tap by name, or is passed
an fd the rig opened, as libvirt and Proxmox do), and the host-side clients
(TCP, ping, VNC) run in it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class TapNetwork:
    """Namespace `lu-XXXX` with tap `lutap0`: host 10.77.0.1/24, guest 10.77.0.2."""

    host_ip = "10.77.0.1"
    guest_ip = "10.77.0.2"
    prefix = 24
    tap = "lutap0"
    guest_mac = "52:54:00:77:00:02"

    def __init__(self, multi_queue: bool = False) -> None:
        self.name = f"lu-{secrets.token_hex(3)}"
        self.multi_queue = multi_queue  # a tap QEMU may open with queues=N
        self.created = False

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def create(self) -> TapNetwork:
        self._ip("netns", "add", self.name)
        self.created = True
        try:
            self._ip("-n", self.name, "link", "set", "lo", "up")
            self._ip("-n", self.name, "tuntap", "add", "dev", self.tap, "mode", "tap",
                     *(["multi_queue"] if self.multi_queue else []))
            self._ip("-n", self.name, "addr", "add", f"{self.host_ip}/{self.prefix}",
                     "dev", self.tap)
            self._ip("-n", self.name, "link", "set", self.tap, "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete the namespace (and the tap in it)."""
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.created = False

    @property
    def ns_path(self) -> str:
        return f"/run/netns/{self.name}"

    def run_inside(self, fn: Callable[[], T]) -> T:
        """Call fn in this thread while it is in the namespace, then come back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.ns_path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                return fn()
            finally:
                _setns(home)
        finally:
            os.close(home)
            os.close(target)

    async def inside(self, fn: Callable[[], T]) -> T:
        """run_inside on a worker thread, so the event loop's thread never moves."""
        return await asyncio.to_thread(self.run_inside, fn)

    def preexec(self) -> Callable[[], None]:
        """For subprocesses that must start inside the namespace (QEMU)."""
        path = self.ns_path

        def enter() -> None:
            fd = os.open(path, os.O_RDONLY)
            _setns(fd)
            os.close(fd)
        return enter

    def open_tap(self) -> int:
        """Open the tap as a manager would before starting QEMU with -netdev tap,fd=N."""
        def open_it() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            try:
                ifr = struct.pack("16sH", self.tap.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
                fcntl.ioctl(fd, TUNSETIFF, ifr)
            except BaseException:
                os.close(fd)
                raise
            return fd
        return self.run_inside(open_it)

    def attached_queues(self) -> int:
        """How many queues the tap has attached now: each is an rx-N in sysfs (read through
        `ip netns exec`, which mounts the namespace's own /sys)."""
        out = subprocess.run(["ip", "netns", "exec", self.name, "ls",
                              f"/sys/class/net/{self.tap}/queues"],
                             check=True, capture_output=True, text=True).stdout
        return sum(1 for name in out.split() if name.startswith("rx-"))

    async def connect(self, host: str, port: int) -> tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter]:
        """A TCP connection made from inside the namespace."""
        def dial() -> socket.socket:
            sock = socket.create_connection((host, port), timeout=10)
            sock.setblocking(False)
            return sock
        sock = await self.inside(dial)
        return await asyncio.open_connection(sock=sock)

    async def ping(self, count: int, interval: float = 0.01) -> tuple[int, int]:
        """Ping the guest from the host side: (sent, received)."""
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.name, "ping", "-q", "-n", "-i", str(interval),
            "-c", str(count), "-W", "2", self.guest_ip,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        for line in text.splitlines():
            if "packets transmitted" in line:
                parts = line.split(",")
                return int(parts[0].split()[0]), int(parts[1].split()[0])
        raise RuntimeError(f"ping printed no summary: {text.strip()}")

    def __enter__(self) -> TapNetwork:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.close()
