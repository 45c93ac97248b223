"""After the point of no return: retire the old QEMU, put paths and display in place.

Shared by the engine and by a repair that rolls an interrupted upgrade
forward (recovery.py), so both finish an upgrade the same way. Nothing here
raises for a problem that leaves the guest running: it is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from typing import Any

from liveupgrade import procs
from liveupgrade.plan import Relocation

SOURCE_EXIT_TIMEOUT = 10.0


async def retire_source(pid: int, created: float | None) -> bool:
    """Kill the old QEMU: after switchover it owns nothing the guest needs.

    It is killed, not asked to `quit`, because a clean exit undoes what the
    new QEMU now shares with it: QEMU unlinks the paths of its listening
    sockets (the same sockets the destination now serves), runs tap
    downscripts (unplugging the tap from its bridge), and honours
    discard-data on shared RAM. Its disks were flushed and released when the
    migration completed. Returns whether it is gone.
    """
    procs.kill(pid, created)
    return await asyncio.to_thread(procs.wait_gone, [pid], SOURCE_EXIT_TIMEOUT)


def move_into_place(relocations: Iterable[Relocation],
                    source_killed_at: float | None) -> tuple[list[str], list[str]]:
    """Rename the sockets that could not be handed over, and the pidfile, to the source's
    paths. Returns (moved, failed). A socket moved here had no listener at its path from
    the moment the old QEMU died until the rename: that gap is reported with the path."""
    moved, failed = [], []
    for rel in relocations:
        if not rel.private.exists() and not rel.private.is_symlink():
            continue  # a repair running again: moved already
        try:
            os.replace(rel.private, rel.original)
            note = ""
            if rel.kind != "pidfile" and source_killed_at is not None:
                gap_ms = (time.monotonic() - source_killed_at) * 1e3
                note = f" (rebound: no listener for {gap_ms:.1f} ms)"
            moved.append(f"{rel.original}{note}")
        except OSError as e:
            failed.append(f"{rel.private} -> {rel.original}: {e.strerror}")
        with contextlib.suppress(OSError):
            rel.private.parent.rmdir()
    return moved, failed


async def rebind_vnc(client: Any, display: str, address: dict[str, Any]) -> str:
    """Point the new QEMU's VNC server back at the display's own address.

    Used when the source's listening socket could not be taken over (the
    source is gone, so its address is free again).
    """
    try:
        await client.execute("display-update", {"type": "vnc", "addresses": [address]})
        return f"VNC {display}: rebound"
    except Exception as e:
        return (f"VNC {display}: NOT handed over ({e}); the display stays on the "
                "destination's private socket")
