"""cpr-exec (QEMU >= 10.2): the VM's own process execs the new QEMU and keeps its PID.

What survives the exec, measured on QEMU 11.1 (tests/test_cpr_exec.py, docs/design.md):

- guest RAM: share=on memory-backend fds (QEMU clears their close-on-exec flag just
  before execvp) and the CPR state, in a memfd named by QEMU_CPR_EXEC_STATE;
- tap descriptors: QEMU opens /dev/net/tun without O_CLOEXEC, and a manager's
  `fd=N` is inherited the same way, so the new QEMU gets `fd=N` for each tap (a
  tap opened by `ifname=` could not be opened again while its fd stays open);
- the PID, so pidfiles, cgroup membership and /proc watchers stay valid.

What the new QEMU redoes itself: every listening socket (QMP, chardevs, VNC) is
close-on-exec and is bound again at the same path (QEMU unlinks a stale socket
file first); client sockets connect again; the pidfile is written and locked
again (same PID). What the engine must change in the command line: no
-daemonize (it would fork, and the VM would lose its PID), no -D (QEMU would
truncate it), `-incoming file:STATE` so the new QEMU loads and resumes on its
own even if this process dies, and a private monitor to reconnect to.

What cannot work: `-sandbox ...,spawn=deny` forbids exec; a vhost-net device is
owned by the old address space (drivers/vhost/vhost.c: VHOST_SET_OWNER from the
new image gets EBUSY, and the old fd stays open); an old binary that cannot load
a newer one's state (as with cpr-transfer). There is no second process to fall
back to: if execvp fails, QEMU resumes the guest itself (the engine rolls back
as usual); if the new QEMU fails after the exec, the VM is gone. So the engine
first rehearses: it starts the target on this command line, paused, and only
execs once that start succeeded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError

from liveupgrade import monitor, procs
from liveupgrade.cmdline import CommandLine
from liveupgrade.errors import SwitchoverFailed, TransferFailed
from liveupgrade.handover import SourceFds, rewrite_log, rewrite_taps
from liveupgrade.plan import Override, finish_for_target, for_target
from liveupgrade.versions import QemuVersion

STATE_FILE = "cpr-exec.state"
EXEC_TIMEOUT = 30.0  # from `migrate` to the new QEMU's monitor; saving device state is quick


def blockers(cmd: CommandLine, fds: SourceFds, libvirt: bool) -> list[str]:
    """Why this VM's process cannot exec the new QEMU in place (empty: it can)."""
    found = []
    sandbox = cmd.first("sandbox")
    if sandbox is not None and sandbox.value and sandbox.keyvals().get("spawn") == "deny":
        found.append("the VM runs under -sandbox spawn=deny, which forbids the exec")
    for ident in sorted(fds.vhost):
        found.append(f"netdev {ident} uses vhost-net, whose device stays owned by the old "
                     "process image (the kernel answers EBUSY to the new one)")
    for ident, why in sorted(fds.tap_problems.items()):
        found.append(f"tap netdev {ident}: {why}")
    taps = list(fds.taps.items())
    taps += [(ident, fd) for ident, queues in fds.mq_taps.items() for fd in queues]
    for ident, fd in sorted(taps):
        if fd in fds.close_on_exec:
            found.append(f"tap netdev {ident}: its fd {fd} is close-on-exec in the source")
    if libvirt:
        found.append("not for libvirt VMs: libvirt starts QEMU under -sandbox spawn=deny "
                     "unless qemu.conf sets seccomp_sandbox = 0, a running daemon holds the "
                     "monitor connection the exec closes (it would take the VM for dead), and "
                     "libvirt 9.0 taking back, after --libvirt-adopt, a QEMU whose binary "
                     "changed under the same PID is untested; use cpr-transfer or shared")
    return found


def build_exec_argv(source_argv: list[str], *, target_binary: Path, machine: str,
                    target_version: QemuVersion | None, state_path: Path, engine_qmp: Path,
                    fds: SourceFds, overrides: list[Override] | None = None,
                    qmp_object: bool = False) -> list[str]:
    """The command line the VM's process execs: its own, for the new binary.

    The taps keep the source's fd numbers (they survive the exec); listening
    sockets keep their paths (the new QEMU binds them again).
    """
    cmd = for_target(source_argv, target_binary, machine, target_version)
    rewrite_taps(cmd, fds, {}, queue_fds=fds.mq_taps)  # each queue keeps its own fd
    rewrite_log(cmd)
    finish_for_target(cmd, overrides, engine_qmp, qmp_object)
    cmd.add("incoming", f"file:{state_path}")
    return cmd.argv()


async def await_exec(client: monitor.Monitor) -> None:
    """After `migrate`: return once the process has exec'd (its monitor went away).

    Raise TransferFailed if the migration failed instead: then execvp failed
    (or saving the state did) and QEMU resumed the guest on the old binary.
    """
    async with asyncio.timeout(EXEC_TIMEOUT):
        while True:
            try:
                info: Any = await client.execute("query-migrate")
            except ExecuteError as e:
                raise TransferFailed(f"QEMU refused query-migrate during cpr-exec: {e}") from e
            except Exception:  # the connection went with the old image
                return
            if info.get("status") in ("failed", "cancelled"):
                raise TransferFailed(
                    f"cpr-exec failed before the exec: {info.get('error-desc') or 'no reason'}",
                    "the VM still runs on the old QEMU; check the target binary")
            await asyncio.sleep(0.005)


async def reconnect(pid: int, created: float | None, engine_qmp: Path,
                    was_running: bool) -> monitor.Monitor:
    """The new image's private monitor, once it has loaded the VM (and runs the guest, if
    it ran). Raises SwitchoverFailed if the process exited (the new QEMU failed after the
    exec) or did not get there within EXEC_TIMEOUT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EXEC_TIMEOUT
    client: monitor.Monitor | None = None
    while client is None:
        if not procs.alive(pid, created):
            raise lost(pid)
        try:
            client = await monitor.connect(engine_qmp, "liveupgrade", 1.0)
        except Exception:
            if loop.time() > deadline:
                raise SwitchoverFailed(
                    f"the new QEMU (PID {pid}) did not open its monitor within "
                    f"{EXEC_TIMEOUT:.0f} s of the exec", "inspect the process") from None
            await asyncio.sleep(0.002)
    while True:
        try:
            state: Any = await client.execute("query-status")
        except Exception:
            raise lost(pid) from None
        if state["running"] or not was_running or state["status"] != "inmigrate":
            return client
        if loop.time() > deadline:
            await client.disconnect()
            raise SwitchoverFailed(f"the new QEMU (PID {pid}) was still loading the VM "
                                   f"{EXEC_TIMEOUT:.0f} s after the exec",
                                   "inspect it with `liveupgrade list` and its monitor")
        await asyncio.sleep(0.002)


def lost(pid: int) -> SwitchoverFailed:
    return SwitchoverFailed(
        f"the new QEMU exited after the exec (PID {pid}) while loading the VM: the VM is not "
        "running (cpr-exec has no old process to fall back to)",
        "start the VM again from its definition; the QEMU's stderr (where the VM's "
        "manager logs it) has the reason")


def state_path(rundir: Path) -> Path:
    return rundir / STATE_FILE


def monitor_path(rundir: Path) -> Path:
    """The engine's private monitor on the new image (the rehearsal has rundir/qmp.sock)."""
    return rundir / "exec-qmp.sock"


def has_exec_d(pid: int, state_file: str) -> bool:
    """Whether the process runs the new image: only its command line names the state file
    (the binary may be the same one, so its exe tells nothing)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"file:{state_file}".encode() in f.read().split(b"\0")
    except OSError:
        return False
