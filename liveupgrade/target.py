"""Probe the --to binary once: is it a QEMU for this architecture, what can it do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveupgrade import monitor
from liveupgrade.errors import MonitorError, TargetBinaryError
from liveupgrade.versions import QemuVersion

PROBE_TIMEOUT = 15.0


@dataclass
class TargetInfo:
    """What a QEMU binary reports about itself, from `-machine none`."""

    path: Path
    version: QemuVersion
    arch: str
    machines: set[str]  # concrete names and aliases
    capabilities: set[str]
    parameters: set[str]


def clean_env() -> dict[str, str]:
    """The environment for a QEMU we start: ours, minus a module dir meant for another build.

    A wrapper (like setup.sh's for QEMU 10.0) sets QEMU_MODULE_DIR for its own
    build; inherited from elsewhere it makes QEMU abort on module load.
    """
    env = dict(os.environ)
    env.pop("QEMU_MODULE_DIR", None)
    return env


def check_executable(path: Path) -> Path:
    resolved = Path(shutil.which(str(path)) or path)
    if not resolved.exists():
        raise TargetBinaryError(f"target binary {path} does not exist",
                                "give the new QEMU's path, e.g. --to /usr/bin/qemu-system-x86_64")
    if resolved.is_dir() or not os.access(resolved, os.X_OK):
        raise TargetBinaryError(f"target binary {path} is not executable",
                                f"chmod +x {path}, or give the QEMU binary itself")
    return resolved.absolute()


async def probe(path: Path) -> TargetInfo:
    """Start the binary with `-machine none -S` and ask it over QMP; never leaves it running."""
    binary = check_executable(path)
    rundir = Path(tempfile.mkdtemp(prefix="liveupgrade-probe-"))
    sock = rundir / "qmp.sock"
    argv = [str(binary), "-machine", "none", "-S", "-nodefaults", "-no-user-config",
            "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=clean_env(), start_new_session=True, umask=0o077)
    except OSError as e:
        raise TargetBinaryError(f"cannot run target binary {binary}: {e.strerror}",
                                "give a qemu-system-* binary built for this host") from e
    try:
        return await _query(binary, proc, sock)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)


async def _query(binary: Path, proc: asyncio.subprocess.Process, sock: Path) -> TargetInfo:
    not_qemu = TargetBinaryError(
        f"{binary} is not a QEMU system emulator (it did not open a QMP monitor)",
        "give a qemu-system-* binary, or a wrapper that execs one")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_TIMEOUT
    while not sock.exists():
        if proc.returncode is not None or loop.time() > deadline:
            err = b""
            if proc.stderr is not None and proc.returncode is not None:
                err = await proc.stderr.read()
            detail = err.decode(errors="replace").strip()[:300]
            if detail:
                not_qemu.args = (f"{not_qemu.args[0]}: {detail}",)
            raise not_qemu
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.02)
    try:
        async with monitor.session(sock, "target-probe") as q:
            version: dict[str, Any] = await monitor.execute(q, "query-version")
            arch = (await monitor.execute(q, "query-target"))["arch"]
            machines = await monitor.execute(q, "query-machines")
            caps = await monitor.execute(q, "query-migrate-capabilities")
            params = await monitor.execute(q, "query-migrate-parameters")
    except MonitorError as e:
        raise TargetBinaryError(f"{binary}: QMP probe failed: {e}") from e
    names = {m["name"] for m in machines} | {m["alias"] for m in machines if m.get("alias")}
    return TargetInfo(binary, QemuVersion.from_qmp(version), arch, names,
                      {c["capability"] for c in caps}, set(params))
