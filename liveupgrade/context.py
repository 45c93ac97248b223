"""Start the destination where the source runs: its namespaces, cgroup and user.

The new QEMU must see what the old one sees: the same network namespace
(its tap devices and TCP ports live there), the same mount namespace
(libvirt gives each domain a private /dev), the same cgroup (resource
limits, device access) and the same uid/gid (file ownership of images and
sockets). The facts are read from /proc; `preexec` applies them in the
child between fork and exec, where the process is still single-threaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# setns(2) flags, by /proc/PID/ns entry; the order is the order they are joined.
NAMESPACES = {"ipc": 0x08000000, "uts": 0x04000000, "net": 0x40000000, "mnt": 0x00020000}
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class SourceContext:
    """Where the source runs, as far as it differs from where we run."""

    pid: int
    namespaces: list[str] = field(default_factory=list)  # the ones that differ from ours
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)  # cgroup.procs files to join

    @property
    def differs(self) -> bool:
        return bool(self.namespaces or self.cgroups or self.uid != os.geteuid()
                    or self.gid != os.getegid())

    def describe(self) -> str:
        parts = [f"uid {self.uid} gid {self.gid}"]
        if self.namespaces:
            parts.append("namespaces " + ", ".join(self.namespaces))
        if self.cgroups:
            parts.append("cgroups " + ", ".join(self.cgroups))
        return "; ".join(parts)


def runnable_by(ctx: SourceContext, paths: list[str]) -> list[str]:
    """The paths the source's user cannot execute (checked as that user, not guessed)."""
    if ctx.uid == os.geteuid() and ctx.gid == os.getegid():
        return []
    blocked = []
    for path in paths:
        try:
            probe = subprocess.run(["test", "-x", path], user=ctx.uid, group=ctx.gid,
                                   extra_groups=ctx.groups, capture_output=True)
        except OSError as e:  # not root: we cannot act as another user at all
            blocked.append(f"{path} (cannot check as uid {ctx.uid}: {e.strerror})")
            continue
        if probe.returncode != 0:
            blocked.append(path)
    return blocked


def _ns_id(pid: int | str, name: str) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/ns/{name}")
    return None


def _cgroups(pid: int | str) -> dict[str, str]:
    """Hierarchy (its controllers, "" for cgroup v2) -> the process's path in it."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            found[controllers] = path
    return found


def _cgroup_mounts() -> dict[str, str]:
    """Hierarchy -> where it is mounted, for v1 (one per controller set) and v2."""
    mounts: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            _, where, fstype, options = line.split()[:4]
            if fstype == "cgroup2":
                mounts.setdefault("", where)
            elif fstype == "cgroup":
                known = {"rw", "ro", "relatime", "nosuid", "nodev", "noexec", "clone_children"}
                wanted = [o for o in options.split(",") if o not in known
                          and not o.startswith(("release_agent=", "xattr"))]
                mounts[",".join(sorted(wanted))] = where
    return mounts


def _cgroup_moves(pid: int) -> list[str]:
    """The cgroup.procs files that put a process where `pid` is (where we are not)."""
    theirs, ours, mounts = _cgroups(pid), _cgroups("self"), _cgroup_mounts()
    moves = []
    for hierarchy, path in theirs.items():
        where = mounts.get(",".join(sorted(hierarchy.split(","))) if hierarchy else "")
        procs = Path(f"{where}{path}/cgroup.procs")
        if where and ours.get(hierarchy) != path and procs.exists():
            moves.append(str(procs))
    return moves


def read_context(pid: int) -> SourceContext:
    """The source's namespaces, cgroup and credentials, where they differ from ours."""
    proc = psutil.Process(pid)
    uids, gids = proc.uids(), proc.gids()
    groups = []
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups = [int(g) for g in line.split()[1:]]
    return SourceContext(
        pid=pid,
        namespaces=[n for n in NAMESPACES if _ns_id(pid, n) != _ns_id("self", n)],
        uid=uids.effective, gid=gids.effective, groups=groups,
        cgroups=_cgroup_moves(pid))


class Joiner:
    """Open the source's namespace files now; join them in the child (`preexec`)."""

    def __init__(self, ctx: SourceContext):
        self.ctx = ctx
        self.ns_fds: list[tuple[int, int]] = []
        for name in ctx.namespaces:
            fd = os.open(f"/proc/{ctx.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            self.ns_fds.append((fd, NAMESPACES[name]))
        self.cgroup_procs = [os.open(procs, os.O_WRONLY | os.O_CLOEXEC) for procs in ctx.cgroups]

    def preexec(self) -> Callable[[], None] | None:
        if not self.ctx.differs:
            return None
        ns_fds, cgroup_procs, ctx = self.ns_fds, self.cgroup_procs, self.ctx

        def join() -> None:  # runs in the forked child: no locks, no allocation-heavy work
            for procs in cgroup_procs:
                os.write(procs, b"0")
            for fd, flag in ns_fds:
                if _libc.setns(fd, flag) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into the source's namespace "
                                  f"(flag {flag:#x}) failed")
            if ctx.uid != os.geteuid() or ctx.gid != os.getegid():
                os.setgroups(ctx.groups)
                os.setresgid(ctx.gid, ctx.gid, ctx.gid)
                os.setresuid(ctx.uid, ctx.uid, ctx.uid)
        return join

    def close(self) -> None:
        for fd, _ in self.ns_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for fd in self.cgroup_procs:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ns_fds, self.cgroup_procs = [], []
