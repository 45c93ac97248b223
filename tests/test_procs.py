"""procs: when a process counts as gone (real processes of the test's own)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from liveupgrade import procs

# A process whose main thread exits first (pthread_exit) while another thread runs
# on, holding the write end of a pipe: the shape a SIGKILLed QEMU often has for a
# moment, its main thread a zombie while its other threads still exit.
MAIN_THREAD_EXITS_FIRST = """
import ctypes, os, sys, threading, time
threading.Thread(target=time.sleep, args=(30,)).start()
os.write(1, b"ready")
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_is_alive_until_its_last_thread_has_exited() -> None:
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS_FIRST],
                            stdout=subprocess.PIPE, pass_fds=[write_end])
    os.close(write_end)
    try:
        assert proc.stdout is not None and proc.stdout.read(5) == b"ready"
        deadline = time.monotonic() + 10
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Its main thread is a zombie, yet it still holds its files: not gone.
        assert procs.alive(proc.pid)
        assert not procs.wait_gone([proc.pid], 0.2)
        os.set_blocking(read_end, False)
        try:
            os.read(read_end, 1)
            raise AssertionError("the pipe's write end was released while a thread ran")
        except BlockingIOError:
            pass
        proc.kill()
        assert procs.wait_gone([proc.pid], 10)
        assert not procs.alive(proc.pid)
        assert os.read(read_end, 1) == b""  # gone means its files are released
    finally:
        proc.kill()
        proc.wait()
        os.close(read_end)
