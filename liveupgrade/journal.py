"""The per-VM transaction that outlives the engine: a journal, a lock, and the steps.

An upgrade changes the host in a fixed order (STEPS). Before each step the
engine writes the step, and the facts needed to undo or finish it, to
``<runtime>/liveupgrade-transactions/<key>.journal`` (written whole to a
temporary file, then renamed over: a reader sees the old record or the new
one, never half).
If the engine dies, whoever repairs the VM (its keeper process, or
``liveupgrade recover``) decides from this record and from the QEMU
processes' own state what to do (recovery.py), never from guesses.

``<key>.lock`` (flock) makes one upgrade per VM at a time. The engine's
keeper inherits the lock's open file description, so the lock stays held
while either of them lives: a second upgrade is refused for as long as the
first one, or its repair, runs. The key is the VM's UUID, which the source
and the destination share, or the source's PID for a VM started without
``-uuid``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveupgrade.cmdline import CommandLine
from liveupgrade.errors import LiveUpgradeError, Refused
from liveupgrade.procs import alive

# The steps of an upgrade, in order. Each is recorded before it is carried out.
STEPS = (
    "planning",  # the run folder is made and the target probed; nothing else has changed
    "libvirt-stopping",  # the libvirt daemon is being stopped (libvirt VMs only)
    "destination-starting",  # the new QEMU is being started (its run folder is recorded)
    "destination-started",  # it runs, paused, waiting for the migration (its PID is recorded)
    "migrating",  # capabilities/parameters set on the source, migration under way
    "exec",  # cpr-exec only: `migrate` sent; the VM's process may exec the new QEMU
    "switchover",  # the migration completed; the destination is being resumed
    "resumed",  # the destination runs the guest: the old QEMU is being killed
    "relocating",  # sockets, display and pidfile are being moved into place
    "adopting",  # libvirt's status points at the new QEMU; the daemon is starting
)
# From this step on the destination may run the guest: a repair rolls forward if the
# destination holds the complete VM state, back otherwise (recovery.py decides).
POINT_OF_NO_RETURN = "switchover"
JOURNAL_FORMAT = 1
FAULT_ENV = "LIVEUPGRADE_TEST_FAULT"  # "STEP:SIGNAL", a test-only hook (see fault_hook)


def runtime_base() -> Path:
    """Where private run folders go: /run/liveupgrade as root, else XDG_RUNTIME_DIR or /tmp.

    /run/liveupgrade is 0711: a destination running as the VM's own user
    (libvirt's libvirt-qemu) may pass through it to its run folder, which is
    0700 and owned by that user, but cannot list or enter the others.
    """
    if os.geteuid() == 0 and Path("/run").is_dir():
        base = Path("/run/liveupgrade")
        base.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(base, 0o711)
        return base
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def transactions_dir() -> Path:
    """The 0700 folder of journals and locks."""
    path = runtime_base() / "liveupgrade-transactions"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def vm_key(uuid: str | None, pid: int) -> str:
    """What identifies a VM across its upgrade: its -uuid, else the source's PID."""
    if uuid and all(c in "0123456789abcdefABCDEF-" for c in uuid):
        return uuid.lower()
    return f"pid-{pid}"


def key_of(cmd: CommandLine, pid: int) -> str:
    """The key of the VM that QEMU process `pid`, started with `cmd`, runs."""
    uuid = cmd.first("uuid")
    return vm_key(uuid.value if uuid is not None else None, pid)


def step_index(step: str) -> int:
    return STEPS.index(step)


@dataclass
class Journal:
    """One VM's transaction record: the last step begun, and the facts it needs."""

    path: Path
    facts: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.facts["key"])

    @property
    def step(self) -> str:
        return str(self.facts["step"])

    @property
    def label(self) -> str:
        return str(self.facts.get("vm") or self.key)

    def reached(self, step: str) -> bool:
        return step_index(self.step) >= step_index(step)

    @classmethod
    def begin(cls, key: str, **facts: Any) -> Journal:
        """A new, not yet written journal for `key`."""
        return cls(transactions_dir() / f"{key}.journal",
                   {"format": JOURNAL_FORMAT, "key": key, "step": None, "steps": [], **facts})

    def record(self, step: str, **facts: Any) -> None:
        """Write `step` (and new facts) durably, before the step is carried out."""
        assert step in STEPS, step
        self.facts.update(facts)
        self.facts["step"] = step
        self.facts["steps"].append([step, round(time.time(), 3)])
        self.write()
        fault_hook(step)

    def update(self, **facts: Any) -> None:
        """Add facts learnt during the current step (e.g. the destination's PID)."""
        self.facts.update(facts)
        self.write()

    def write(self) -> None:
        """Replace the record atomically (a reader sees the old or the new one, whole).

        No fsync: the journal must survive the death of this process, which
        never loses written data, not a crash of the host, after which no
        QEMU of the upgrade runs and /run starts empty. An fsync would cost
        milliseconds on a disk-backed /run, one of them inside the guest's
        pause (the `switchover` record precedes `cont`).
        """
        data = json.dumps(self.facts, default=str).encode()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @classmethod
    def load(cls, path: Path) -> Journal:
        try:
            facts = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LiveUpgradeError(f"cannot read the upgrade journal {path}: {e}",
                                   "inspect it by hand; remove it once the VM runs on one QEMU"
                                   ) from e
        if facts.get("format") != JOURNAL_FORMAT or facts.get("step") not in STEPS:
            raise LiveUpgradeError(f"{path} is not an upgrade journal this liveupgrade "
                                   f"understands (format {facts.get('format')})",
                                   "recover it with the liveupgrade version that wrote it")
        return cls(path, facts)


def journals() -> list[Journal]:
    """Every transaction on this host that has not ended (in progress or interrupted)."""
    found = []
    with contextlib.suppress(OSError):
        for path in sorted(transactions_dir().glob("*.journal")):
            with contextlib.suppress(LiveUpgradeError):
                found.append(Journal.load(path))
    return found


def destination_of(argv: list[str], pid: int,
                   among: list[Journal] | None = None) -> Journal | None:
    """The transaction whose (half-started) destination this process is, or None.

    A destination is recognised by its run folder on its command line (its
    private monitor lives there), which the journal records before it starts.
    The VM's own process never is one, even when its command line names the run
    folder (after cpr-exec, the process exec'd the new QEMU and is still the VM).
    """
    for journal in journals() if among is None else among:
        if (journal.facts.get("source") or {}).get("pid") == pid:
            continue
        rundir = journal.facts.get("rundir")
        dst = journal.facts.get("destination") or {}
        if dst.get("pid") == pid or (rundir and any(rundir in arg for arg in argv)):
            return journal
    return None


def fault_hook(step: str) -> None:
    """Test-only: with LIVEUPGRADE_TEST_FAULT=STEP:SIGNAL, signal ourselves at STEP.

    The fault-matrix tests kill the tool exactly as an OOM kill, a dropped SSH
    session or `kill` would, at a chosen step; unset, this does nothing.
    """
    wanted = os.environ.get(FAULT_ENV, "")
    at, _, sig = wanted.partition(":")
    if at == step:
        os.kill(os.getpid(), signal.Signals[f"SIG{sig or 'KILL'}"])


class VMLock:
    """One upgrade (or repair) per VM at a time: flock on <key>.lock.

    The file is unlinked by whoever releases it; an acquirer that finds it
    has locked an unlinked file tries again (the usual flock-and-unlink dance).
    """

    def __init__(self, key: str, fd: int, path: Path):
        self.key, self.fd, self.path = key, fd, path

    @classmethod
    def try_acquire(cls, key: str) -> VMLock | None:
        """The lock, or None if someone holds it."""
        path = transactions_dir() / f"{key}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                lock = cls(key, fd, path)
                lock.note_owners(os.getpid())
                return lock
            os.close(fd)

    def note_owners(self, pid: int, keeper: int | None = None) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": pid, "keeper": keeper}).encode(), 0)

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        os.close(self.fd)
        self.fd = -1


def holder(key: str) -> str:
    """Who holds `key`'s lock, in words: "PID N" (or its keeper once N has died)."""
    try:
        owners = json.loads((transactions_dir() / f"{key}.lock").read_text() or "{}")
    except (OSError, ValueError):
        return "PID unknown"
    pid, keeper = owners.get("pid"), owners.get("keeper")
    if pid and not alive(pid) and keeper and alive(keeper):
        return f"PID {pid} exited; its keeper, PID {keeper}, is finishing it"
    return f"PID {pid}"


def owners_alive(key: str) -> bool:
    """Whether the engine or the keeper that holds `key`'s lock still runs (read from the
    lock file, without taking the lock: `list` must never make an upgrade fail)."""
    try:
        owners = json.loads((transactions_dir() / f"{key}.lock").read_text() or "{}")
    except (OSError, ValueError):
        return False
    return alive(owners.get("pid")) or alive(owners.get("keeper"))


def describe(journal: Journal) -> str:
    """A transaction's state for `list`: in progress, or interrupted and what to run."""
    if owners_alive(journal.key):
        return f"upgrade in progress ({holder(journal.key)}), at step '{journal.step}'"
    return (f"upgrade interrupted at step '{journal.step}': run "
            f"`liveupgrade recover {journal.label}`")


@contextlib.contextmanager
def claimed(key: str, label: str) -> Iterator[VMLock]:
    """Hold `key`'s lock for an upgrade; refuse if one runs or one was interrupted."""
    lock = VMLock.try_acquire(key)
    if lock is None:
        raise Refused(f"an upgrade of VM {label} is in progress ({holder(key)})",
                      "wait for it to finish; `liveupgrade list` shows it")
    try:
        journal = transactions_dir() / f"{key}.journal"
        if journal.exists():
            step = "?"
            with contextlib.suppress(LiveUpgradeError):
                step = Journal.load(journal).step
            raise Refused(f"an earlier upgrade of VM {label} was interrupted (at step "
                          f"'{step}') and not repaired", f"run: liveupgrade recover {label}")
        yield lock
    finally:
        lock.release()
