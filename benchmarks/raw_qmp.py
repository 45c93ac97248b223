"""The same upgrade as the engine does, done with the fewest raw QMP steps.

This is the yardstick for engine overhead: no inspection, no probe, no
checks, no rollback; only start the destination, migrate, resume, quit.
`python -m benchmarks.raw_qmp PID QMP TARGET MODE` runs it as a process of
its own (benchmarks/command.py times it beside the whole `liveupgrade`
command); it imports nothing of liveupgrade, as a minimal script would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.events import EventListener


def clean_env() -> dict[str, str]:
    """Our environment minus a module folder meant for another QEMU build."""
    return {k: v for k, v in os.environ.items() if k != "QEMU_MODULE_DIR"}


def _stamp(event: Any) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


async def raw_upgrade(source_argv: list[str], source_qmp: Path, target: Path, mode: str,
                      workdir: Path, *, rewrite: Callable[[list[str]], list[str]] | None = None,
                      pass_fds: Sequence[int] = (), preexec_fn: Callable[[], None] | None = None,
                      source_pid: int | None = None, before_cont: Callable[[], None] | None = None
                      ) -> tuple[dict[str, Any], subprocess.Popen[bytes] | None]:
    """Upgrade with bare QMP; QEMU's figures, the wall time, and the new process (None for
    cpr-exec: the VM's own process becomes the new QEMU).

    `rewrite` edits the destination's argv further (e.g. a tap by fd from
    `pass_fds`); `preexec_fn` runs in it before exec (e.g. joining the VM's
    network namespace). With `source_pid` the old QEMU is killed as the engine
    does, else it is asked to quit. `before_cont` is called at switchover.
    """
    if mode == "cpr-exec":
        return await _raw_exec(source_argv, source_qmp, target, workdir), None
    started = time.monotonic()
    dst_qmp = workdir / "raw-dst-qmp.sock"
    mig = workdir / "raw-mig.sock"
    cpr = workdir / "raw-cpr.sock"
    argv = [str(target)] + [a.replace(str(source_qmp), str(dst_qmp)) for a in source_argv[1:]]
    argv = rewrite(argv) if rewrite else argv
    argv += ["-S", "-incoming", "defer"]
    if mode == "cpr-transfer":
        argv += ["-incoming", json.dumps({"channel-type": "cpr", "addr": {
            "transport": "socket", "type": "unix", "path": str(cpr)}})]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=clean_env(), start_new_session=True,
                            pass_fds=pass_fds, preexec_fn=preexec_fn)
    src = QMPClient("raw-src")
    await src.connect(str(source_qmp))
    stops = EventListener(("STOP",))
    resumes = EventListener(("RESUME",))
    src.register_listener(stops)
    caps = {"shared": ["x-ignore-shared"], "copy": ["multifd"], "cpr-transfer": []}[mode]
    dst = QMPClient("raw-dst")
    listener = EventListener(("MIGRATION",))
    main_addr = {"transport": "socket", "type": "unix", "path": str(mig)}

    async def connect_dst() -> None:
        while True:  # the socket file appears just before QEMU listens on it
            try:
                await dst.connect(str(dst_qmp))
                break
            except Exception:
                await asyncio.sleep(0.001)
        dst.register_listener(listener)
        dst.register_listener(resumes)
        await dst.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": c, "state": True} for c in ["events", *caps]]})

    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": c, "state": True} for c in caps]})
    await src.execute("migrate-set-parameters", {"max-bandwidth": 100 * 1024**3,
                                                 "downtime-limit": 100})
    if mode == "cpr-transfer":
        await src.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
        while not cpr.exists():
            await asyncio.sleep(0.001)
        await src.execute("migrate", {"channels": [
            {"channel-type": "main", "addr": main_addr},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                             "path": str(cpr)}}]})
        await connect_dst()
        await dst.execute("migrate-incoming", {"channels": [
            {"channel-type": "main", "addr": main_addr}]})
    else:
        await connect_dst()
        await dst.execute("migrate-incoming", {"uri": f"unix:{mig}"})
        await src.execute("migrate", {"uri": f"unix:{mig}"})
    while True:
        event: Any = await listener.get()
        if event["data"]["status"] in ("completed", "failed"):
            break
    if before_cont is not None:
        before_cont()
    await dst.execute("cont")
    resumed = time.monotonic()
    info: Any = await src.execute("query-migrate")
    stop_times, resume_times = stops.clear(), resumes.clear()
    if source_pid is not None:
        with contextlib.suppress(Exception):
            await src.disconnect()
        os.kill(source_pid, signal.SIGKILL)
    else:
        with contextlib.suppress(Exception):  # QEMU may close the socket before it replies
            await src.execute("quit")
        with contextlib.suppress(Exception):
            await src.disconnect()
    await dst.disconnect()
    vcpu_pause = ((_stamp(resume_times[0]) - _stamp(stop_times[-1])) * 1e3
                  if stop_times and resume_times else None)
    return {"wall_s": resumed - started, "downtime_ms": info.get("downtime"),
            "vcpu_pause_ms": vcpu_pause,
            "total_time_ms": info.get("total-time"),
            "ram_transferred": (info.get("ram") or {}).get("transferred")}, proc


async def _raw_exec(source_argv: list[str], source_qmp: Path, target: Path,
                    workdir: Path) -> dict[str, Any]:
    """cpr-exec by hand: the source execs the target on its own argv plus -incoming file:,
    which loads the state and resumes by itself; reconnect to the same QMP path."""
    started = time.monotonic()
    state = workdir / "raw-cpr-exec.state"
    argv = [str(target), *source_argv[1:], "-incoming", f"file:{state}"]
    src = QMPClient("raw-src")
    await src.connect(str(source_qmp))
    stops = EventListener(("STOP",))
    src.register_listener(stops)
    await src.execute("migrate-set-parameters", {"mode": "cpr-exec", "cpr-exec-command": argv})
    await src.execute("migrate", {"uri": f"file:{state}"})
    with contextlib.suppress(Exception):
        while True:  # until the old image's monitor goes away with it
            await src.execute("query-migrate")
            await asyncio.sleep(0.002)
    stop_times = stops.clear()
    with contextlib.suppress(Exception):
        await src.disconnect()
    new = QMPClient("raw-new")
    while True:
        try:
            await new.connect(str(source_qmp))
            break
        except Exception:
            await asyncio.sleep(0.001)
    while not (await new.execute("query-status"))["running"]:  # type: ignore[index]
        await asyncio.sleep(0.001)
    running_wall, resumed = time.time(), time.monotonic()
    await new.disconnect()
    return {"wall_s": resumed - started, "downtime_ms": None,
            "vcpu_pause_ms": (running_wall - _stamp(stop_times[-1])) * 1e3 if stop_times
            else None, "total_time_ms": None, "ram_transferred": 0}


def main(args: list[str]) -> int:
    pid, qmp, target, mode = args
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    figures, _ = asyncio.run(raw_upgrade(argv, Path(qmp), Path(target), mode, Path(qmp).parent))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
