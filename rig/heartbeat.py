"""Host-side reader of the fixture guests' heartbeat protocol.

Each QEMU connects to the reader (its chardev is a socket *client*), so the
destination of an upgrade is already connected before it resumes the guest,
and no heartbeat is dropped while a socket changes hands. Bytes from every
connection are joined into one stream in arrival order: the source has
stopped before the destination runs, so a line the guest started on the
source and finished on the destination still parses as one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Heartbeat:
    """One ``HB`` line with the host-monotonic time it arrived."""

    host_time: float
    seq: int
    guest_us: int
    dirtied: int
    passes: int
    errors: int
    disk_seq: int | None = None
    disk_errors: int | None = None


@dataclass(frozen=True)
class Gap:
    """The longest silence between two consecutive heartbeats."""

    seconds: float
    before: Heartbeat | None
    after: Heartbeat | None


@dataclass
class HeartbeatLog:
    """Everything a guest said, parsed, with arrival times."""

    beats: list[Heartbeat] = field(default_factory=list)
    boots: list[str] = field(default_factory=list)
    ready: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def add_line(self, host_time: float, line: str) -> None:
        parts = line.split()
        if not parts:
            return
        kind, values = parts[0], parts[1:]
        try:
            if kind == "HB" and len(values) >= 5:
                nums = [int(v, 16) for v in values]
                extra = [*nums[5:7], None, None]
                self.beats.append(Heartbeat(host_time, seq=nums[0], guest_us=nums[1],
                                            dirtied=nums[2], passes=nums[3], errors=nums[4],
                                            disk_seq=extra[0], disk_errors=extra[1]))
                return
        except ValueError:
            pass
        {"BOOT": self.boots, "READY": self.ready, "ERR": self.error_lines}.get(
            kind, self.other
        ).append(line)

    @property
    def last(self) -> Heartbeat | None:
        return self.beats[-1] if self.beats else None

    def window(self, start: float = 0.0, end: float = float("inf")) -> list[Heartbeat]:
        """Heartbeats that arrived in [start, end] (host-monotonic seconds)."""
        return [b for b in self.beats if start <= b.host_time <= end]

    def max_gap(self, start: float = 0.0, end: float = float("inf")) -> Gap:
        """Largest arrival gap between consecutive heartbeats in the window.

        The last beat before `start` and the first after `end` are included,
        so a pause that spans an edge of the window is still measured whole
        (with a 10 ms heartbeat, a short pause may have no beat inside it).
        """
        beats = self.window(start, end)
        earlier = [b for b in self.beats if b.host_time < start]
        later = [b for b in self.beats if b.host_time > end]
        beats = earlier[-1:] + beats + later[:1]
        best = Gap(0.0, None, None)
        for before, after in itertools.pairwise(beats):
            if after.host_time - before.host_time > best.seconds:
                best = Gap(after.host_time - before.host_time, before, after)
        return best

    def sequence_faults(self) -> list[str]:
        """Every place the guest's heartbeat counter did not advance by exactly one."""
        faults = []
        for before, after in zip(self.beats, self.beats[1:], strict=False):
            if after.seq != before.seq + 1:
                faults.append(f"seq {before.seq:#x} -> {after.seq:#x}")
        return faults


class HeartbeatServer:
    """A unix-socket server the guest's serial chardev connects to."""

    def __init__(self, path: Path, on_line: Callable[[float, str], None] | None = None):
        self.path = path
        self.log = HeartbeatLog()
        self.connections = 0
        self._on_line = on_line
        self._server: asyncio.AbstractServer | None = None
        self._buffer = b""
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in self._tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while chunk := await reader.read(65536):
                await self._feed(time.monotonic(), chunk)
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _feed(self, now: float, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("ascii", "replace").strip()
            self.log.add_line(now, line)
            if self._on_line:
                self._on_line(now, line)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[HeartbeatLog], bool], timeout: float) -> None:
        """Wait until `predicate(log)` holds; TimeoutError names what was seen."""
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(lambda: predicate(self.log))
        except TimeoutError:
            last = self.log.last
            raise TimeoutError(
                f"guest heartbeat condition not met in {timeout:.1f}s "
                f"({len(self.log.beats)} heartbeats, last {last})"
            ) from None

    async def wait_beats(self, count: int, timeout: float) -> None:
        """Wait for `count` more heartbeats than have arrived so far."""
        target = len(self.log.beats) + count
        await self.wait_for(lambda log: len(log.beats) >= target, timeout)
