"""Process facts the engine and its repairs rely on: is it still the same process,
kill it, wait for it to go (without reaping another parent's child)."""

from __future__ import annotations

import ctypes
import os
import signal
import time

import psutil

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

CREATE_TIME_SLACK = 0.05  # psutil's create_time is derived from boot ticks


def alive(pid: int | None, create_time: float | None = None) -> bool:
    """Whether `pid` still is the process it was (same start time) and any of its
    threads still runs.

    A zombie main thread is not enough to call it gone: SIGKILLed, QEMU's main
    thread often turns zombie while its other threads still exit (measured: 19 of
    30 kills), and the process's files (a tap queue, an image lock) are released
    only when the last of them is done.
    """
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > CREATE_TIME_SLACK:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE or _threads_left(pid)
    except psutil.Error:
        return False


def _threads_left(pid: int) -> bool:
    """Whether a thread of `pid` other than its zombie main thread still exists."""
    try:
        return any(int(tid) != pid for tid in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


def create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def kill(pid: int, created: float | None = None) -> bool:
    """SIGKILL `pid` if it still is the process it was; True if it was signalled."""
    if not alive(pid, created):
        return False
    try:
        psutil.Process(pid).kill()
    except psutil.Error:
        return False
    return True


def wait_gone(pids: list[int], timeout: float) -> bool:
    """Wait until each process has exited (zombie or gone), without reaping it:
    its parent (asyncio's child watcher, init) may be waiting on it."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
    return True


def die_with_parent() -> None:
    """preexec_fn for helper processes (the target probe): SIGKILL them when we die.

    Only for processes that must not outlive the engine; never for a
    destination, whose fate the keeper decides.
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
