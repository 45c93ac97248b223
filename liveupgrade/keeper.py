"""The keeper: a small process that finishes an upgrade whose engine died.

The engine starts one keeper per upgrade, in a session of its own (a hangup
of the operator's terminal does not reach it), before it changes anything.
The keeper holds two inherited descriptors: the read end of a pipe whose
write end only the engine has, and the VM's lock. It blocks reading the pipe:

- the engine ends normally (upgraded, refused, or rolled back by itself) and
  writes ``done``: the keeper exits at once;
- the engine dies in any way, SIGKILL included: the kernel closes its end, the
  keeper reads EOF without ``done`` and repairs the VM from the journal
  (recovery.py) while it still holds the lock, then exits.

So no daemon runs when no upgrade does, and nothing depends on systemd.
Its log (what it found, what it did) is appended to ``<runtime>/recovery.log``.

The keeper starts while the engine plans, on a host whose cores the running
guest needs: it starts without `site` (the package is found through
PYTHONPATH) and imports nothing but the standard library's basics until it
has to repair (measured: 70 ms of CPU with site and asyncio, ~10 ms without).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only the engine's side uses these: the keeper itself starts without them
    import subprocess

READY_TIMEOUT = 10.0
DONE = b"done"
JOURNAL_ENV = "LIVEUPGRADE_KEEPER_JOURNAL"
PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


def log_path() -> Path:
    from liveupgrade.journal import runtime_base
    return runtime_base() / "recovery.log"


class Keeper:
    """The engine's handle on its keeper process."""

    def __init__(self, proc: subprocess.Popen[bytes], lifeline: int, ready: int):
        self.proc, self._lifeline, self._ready = proc, lifeline, ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def spawn(cls, journal_path: Path, lock_fd: int) -> Keeper:
        """Start the keeper. It is armed from the moment it exists: the lifeline's read
        end is its from birth, so the engine's death reaches it even before it runs."""
        import subprocess

        from liveupgrade.errors import LiveUpgradeError

        # The journal's path (it names the VM's UUID) goes in the environment, not
        # argv: whoever looks for the VM's processes by UUID finds only its QEMUs.
        env = dict(os.environ, **{JOURNAL_ENV: str(journal_path)})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_PARENT,
                                                          env.get("PYTHONPATH")]))
        life_r, life_w = os.pipe()
        ready_r, ready_w = os.pipe()
        log = os.open(log_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-S", "-m", "liveupgrade.keeper", str(life_r), str(ready_w),
                 str(lock_fd)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, pass_fds=[life_r, ready_w, lock_fd],
                start_new_session=True, env=env)
        except OSError as e:
            os.close(life_w)
            os.close(ready_r)
            raise LiveUpgradeError(f"cannot start the upgrade's keeper process: {e}",
                                   "check that the Python interpreter can run") from e
        finally:
            for fd in (life_r, ready_w, log):
                os.close(fd)
        return cls(proc, life_w, ready_r)

    async def armed(self) -> None:
        """Confirm the keeper runs its watch (the engine asks before the migration)."""
        import asyncio

        from liveupgrade.errors import LiveUpgradeError

        loop = asyncio.get_running_loop()
        try:
            word = await asyncio.wait_for(loop.run_in_executor(None, os.read, self._ready, 16),
                                          READY_TIMEOUT)
        except TimeoutError:
            word = b""
        if word != b"ready":  # the caller rolls back, then closes the transaction
            raise LiveUpgradeError(
                "the upgrade's keeper process did not start, so nothing could finish the "
                f"upgrade if this command died; it was rolled back (see {log_path()})",
                "check that `python -S -m liveupgrade.keeper` runs with this interpreter")

    async def dismiss(self, ended: bool) -> None:
        """Let the keeper go. `ended` (the journal is removed): it exits at once, and we do
        not wait for that (the lock's file is unlinked on release, so a next upgrade locks
        a fresh one). Else it repairs the VM from the journal, as if this process had
        died, and we wait for the repair to finish."""
        import asyncio

        if self._lifeline >= 0:
            if ended:
                with contextlib.suppress(OSError):
                    os.write(self._lifeline, DONE)
            os.close(self._lifeline)
            self._lifeline = -1
        if self._ready >= 0:
            os.close(self._ready)
            self._ready = -1
        if not ended:
            await asyncio.to_thread(self.proc.wait)


def watch(journal_path: Path, lifeline: int, ready: int, lock_fd: int) -> int:
    """The keeper's body: wait for the engine's word, or its death."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(BrokenPipeError):  # the engine finished before we were ready
        os.write(ready, b"ready")
    os.close(ready)
    said = b""
    while chunk := os.read(lifeline, 64):
        said += chunk
    if said.startswith(DONE):
        return 0
    import site  # only now: the venv's packages (qemu.qmp, psutil) for the repair

    site.main()
    import asyncio

    from liveupgrade import recovery
    return asyncio.run(recovery.repair_by_keeper(journal_path, lock_fd))


def main(argv: list[str]) -> int:
    lifeline, ready, lock_fd = argv
    return watch(Path(os.environ[JOURNAL_ENV]), int(lifeline), int(ready), int(lock_fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
