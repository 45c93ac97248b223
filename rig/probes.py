"""What a VM's users see of an upgrade, measured from outside the guest.

- `CounterStream`: a TCP connection to the guest's counter service; every
  record must follow the one before (no reset, loss or duplicate), and the
  longest pause between records is the TCP stall.
- `AcceptProbe`: connects to a listening unix socket over and over (QMP:
  until its greeting arrives, so a live QEMU accepted it); the longest time
  between two successful probes is the re-accept gap.
- `vnc_banner`: a VNC server's greeting, proof that something serves the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from rig.netns import TapNetwork
from rig.vm import FixtureVM


@dataclass
class CounterStream:
    """Reads "%016llu\\n" records; faults lists every break in the sequence."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last: int | None = None
    records: int = 0
    faults: list[str] = field(default_factory=list)
    longest_stall: float = 0.0
    _last_time: float = 0.0
    _task: asyncio.Task[None] | None = None
    error: BaseException | None = None

    def start(self) -> None:
        self._last_time = time.monotonic()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    self.faults.append(f"EOF after {self.last}")
                    return
                now = time.monotonic()
                value = int(line)
                if self.last is not None and value != self.last + 1:
                    self.faults.append(f"{self.last} followed by {value}")
                if self.records:
                    self.longest_stall = max(self.longest_stall, now - self._last_time)
                self.last, self._last_time = value, now
                self.records += 1
        except (ConnectionError, ValueError) as e:
            self.error = e
            self.faults.append(f"{type(e).__name__}: {e}")

    async def wait_for(self, records: int, timeout: float) -> None:
        """Until `records` more records have arrived (or the stream broke)."""
        target = self.records + records
        deadline = time.monotonic() + timeout
        while self.records < target and time.monotonic() < deadline and self._task \
                and not self._task.done():
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@dataclass
class AcceptProbe:
    """Connect to `path` every `interval` s; record when each attempt was served.

    It runs on a thread of its own, so what it measures is the socket, not
    how busy the event loop of the process that runs the upgrade is.
    """

    path: Path
    expect_greeting: bool = False  # QMP greets on accept: wait for its first byte
    interval: float = 0.002
    served: list[float] = field(default_factory=list)
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"accept-probe {self.path.name}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(str(self.path))
                    if self.expect_greeting:
                        sock.recv(1)
                self.served.append(time.monotonic())
            except OSError:
                self.refused += 1
            self._stop.wait(self.interval)

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without a served probe, within [start, end]."""
        times = [start] + [t for t in self.served if start < t < end] + [end]
        return max(b - a for a, b in itertools.pairwise(times))


async def vnc_banner(reader: asyncio.StreamReader) -> bytes:
    """The RFB greeting a VNC server sends first ("RFB 003.008\\n")."""
    return await asyncio.wait_for(reader.readexactly(12), 5)


@dataclass
class NetworkObservation:
    """What the VM's network users saw while `action` ran (an upgrade, or nothing)."""

    pings_sent: int
    pings_received: int
    stream_faults: list[str]
    longest_tcp_stall_ms: float
    accept_gaps_ms: dict[str, float]  # socket name -> longest time no client was served
    action_result: object = None
    guest_pause_ms: float = 0.0  # the heartbeat gap that spans the switchover mark

    @property
    def pings_lost(self) -> int:
        return self.pings_sent - self.pings_received


COUNTER_PORT = 7777
ECHO_PORT = 7


async def observe_network(vm: FixtureVM, network: TapNetwork,
                          action: Callable[[Callable[[], None]], Awaitable[object]],
                          pings: int = 300) -> NetworkObservation:
    """Run `action` one second into a 100/s ping, with a TCP counter stream open
    and the VM's QMP and console sockets probed; `action` calls its argument
    at the moment the accept gap starts to count (switchover)."""
    stream = CounterStream(*await network.connect(network.guest_ip, COUNTER_PORT))
    stream.start()
    await stream.wait_for(200, 30)
    stream.longest_stall = 0.0  # measure from here on
    probes = {"qmp": AcceptProbe(vm.qmp_path, expect_greeting=True)}
    if vm.config.console_socket:
        probes["console"] = AcceptProbe(vm.console_path)
    for probe in probes.values():
        probe.start()
    pinger = asyncio.ensure_future(network.ping(pings))
    marks: list[float] = []
    try:
        await asyncio.sleep(1.0)
        started = time.monotonic()
        result = await action(lambda: marks.append(time.monotonic()))
        done = time.monotonic()
        sent, received = await pinger
        await stream.wait_for(500, 30)
    finally:
        for probe in probes.values():
            await probe.stop()
        await stream.close()
    origin = marks[0] if marks else started
    return NetworkObservation(
        sent, received, list(stream.faults), stream.longest_stall * 1e3,
        {name: p.longest_gap(origin, done + 0.2) * 1e3 for name, p in probes.items()},
        result, vm.heartbeat.log.max_gap(origin, origin).seconds * 1e3)


async def observe_upgrade(vm: FixtureVM, network: TapNetwork, target: Path,
                          source: str | int | None = None, pings: int = 300,
                          mode: str = "auto") -> NetworkObservation:
    """observe_network around a liveupgrade upgrade of `vm` (or of `source`: its PID, QMP
    path or name) to `target` in `mode`, with the accept gaps counted from switchover."""
    from liveupgrade import engine
    from liveupgrade.report import UpgradeEvent

    async def upgrade(at_switchover: Callable[[], None]) -> object:
        def note(event: UpgradeEvent) -> None:
            if event.phase == "switchover":
                at_switchover()
        return await engine.upgrade(vm.pid if source is None else source, target,
                                    mode=mode, on_event=note)

    return await observe_network(vm, network, upgrade, pings=pings)
