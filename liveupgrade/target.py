"""Probe the --to binary once: is it a QEMU for this architecture, what can it do."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveupgrade import monitor, procs
from liveupgrade.errors import MonitorError, TargetBinaryError
from liveupgrade.versions import QemuVersion

PROBE_TIMEOUT = 15.0


CACHE_VERSION = 3


@dataclass
class TargetInfo:
    """What a QEMU binary reports about itself, from `-machine none`."""

    path: Path
    version: QemuVersion
    arch: str
    machines: set[str]  # concrete names and aliases
    capabilities: set[str]
    parameters: set[str]
    real_exe: str = ""  # the binary a wrapper script execs
    qom_types: set[str] = dataclasses.field(default_factory=set)  # devices, objects
    chardev_backends: set[str] = dataclasses.field(default_factory=set)
    netdev_types: set[str] = dataclasses.field(default_factory=set)
    block_drivers: set[str] = dataclasses.field(default_factory=set)
    cpu_models: set[str] = dataclasses.field(default_factory=set)
    data_dirs: list[str] = dataclasses.field(default_factory=list)  # `-L help`, in order

    def to_cache(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}

    @classmethod
    def from_cache(cls, path: Path, data: dict[str, Any]) -> TargetInfo:
        fields: dict[str, Any] = {k: set(v) if isinstance(v, list) else v
                                  for k, v in data.items()}
        fields["version"] = QemuVersion(**data["version"])
        fields["data_dirs"] = list(data["data_dirs"])  # ordered: a search path
        return cls(path=path, **fields)


def _stat_key(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "liveupgrade" / "probes"


def _cache_file(binary: Path) -> Path:
    return cache_dir() / (hashlib.sha256(str(binary).encode()).hexdigest()[:32] + ".json")


def cached_probe(binary: Path) -> TargetInfo | None:
    """A probe result still valid for this file and the binary it execs (same inode, mtime)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(_cache_file(binary).read_text())
        if data["cache_version"] != CACHE_VERSION or data["stat"] != _stat_key(str(binary)):
            return None
        info = data["info"]
        if info["real_exe"] and data["real_stat"] != _stat_key(info["real_exe"]):
            return None
        return TargetInfo.from_cache(binary, info)
    return None


def _store(info: TargetInfo) -> None:
    with contextlib.suppress(OSError):
        path = _cache_file(info.path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "cache_version": CACHE_VERSION, "binary": str(info.path),
            "stat": _stat_key(str(info.path)),
            "real_stat": _stat_key(info.real_exe) if info.real_exe else None,
            "info": info.to_cache()}))
        tmp.replace(path)


def clean_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a QEMU we start: ours (or `base`, e.g. the source's),
    minus a module dir meant for another build.

    A wrapper (like setup.sh's for QEMU 10.0) sets QEMU_MODULE_DIR for its own
    build; inherited from elsewhere it makes QEMU abort on module load.
    """
    env = dict(os.environ if base is None else base)
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


async def probe(path: Path, use_cache: bool = True) -> TargetInfo:
    """What the binary supports: from the cache, or by starting it with `-machine none -S`
    and asking over QMP (~60 ms); never leaves a process running."""
    binary = check_executable(path)
    if use_cache and (hit := cached_probe(binary)) is not None:
        return hit
    info = await _probe_process(binary)
    info.data_dirs = await _data_dirs(binary)
    _store(info)
    return info


async def _probe_process(binary: Path) -> TargetInfo:
    rundir = Path(tempfile.mkdtemp(prefix="liveupgrade-probe-"))
    sock = rundir / "qmp.sock"
    argv = [str(binary), "-machine", "none", "-S", "-nodefaults", "-no-user-config",
            "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=clean_env(), start_new_session=True, umask=0o077,
            preexec_fn=procs.die_with_parent)
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
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.002)
    try:
        async with monitor.session(sock, "target-probe", new=True) as q:
            version: dict[str, Any] = await monitor.execute(q, "query-version")
            arch = (await monitor.execute(q, "query-target"))["arch"]
            machines = await monitor.execute(q, "query-machines")
            caps = await monitor.execute(q, "query-migrate-capabilities")
            params = await monitor.execute(q, "query-migrate-parameters")
            types = await monitor.execute(q, "qom-list-types", {"abstract": True})
            chardevs = await monitor.execute(q, "query-chardev-backends")
            cpus = await monitor.execute(q, "query-cpu-definitions")
            schema = await monitor.execute(q, "query-qmp-schema")
    except MonitorError as e:
        detail = ""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 2)
            if proc.stderr is not None:
                detail = (await proc.stderr.read()).decode(errors="replace").strip()[:300]
        code = proc.returncode
        if code is not None and code != 0:
            how = (f"killed by signal {-code}" if code < 0 else f"exited with {code}")
            raise TargetBinaryError(f"{binary}: the QEMU being probed died ({how}) while it "
                                    f"answered the probe: {detail or e}",
                                    "run the binary by hand to see why it stops; check the "
                                    "system log for the OOM killer or a crash") from e
        raise TargetBinaryError(f"{binary}: QMP probe failed: {detail or e}",
                                "a QEMU copied away from its install needs QEMU_MODULE_DIR: "
                                "give a wrapper script that sets it and execs the binary") from e
    names = {m["name"] for m in machines} | {m["alias"] for m in machines if m.get("alias")}
    try:
        real_exe = os.readlink(f"/proc/{proc.pid}/exe")
    except OSError:
        real_exe = ""
    return TargetInfo(binary, QemuVersion.from_qmp(version), arch, names,
                      {c["capability"] for c in caps}, set(params),
                      "" if real_exe == str(binary) else real_exe,
                      qom_types={t["name"] for t in types},
                      chardev_backends={c["name"] for c in chardevs},
                      netdev_types=_schema_enum(schema, {"tap", "socket", "hubport"}),
                      block_drivers=_schema_enum(schema, {"qcow2", "raw", "file"}),
                      cpu_models={c["name"] for c in cpus} | {"host", "max", "base"})


async def _data_dirs(binary: Path) -> list[str]:
    """Where the binary looks for firmware and ROM files, as it says with `-L help`."""
    proc = await asyncio.create_subprocess_exec(
        str(binary), "-L", "help", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=clean_env())
    out, _ = await proc.communicate()
    return [line.strip() for line in out.decode(errors="replace").splitlines() if line.strip()]


def _schema_enum(schema: list[dict[str, Any]], marker: set[str]) -> set[str]:
    """The values of the introspected enum that contains `marker` (type names are masked)."""
    for entry in schema:
        if entry.get("meta-type") == "enum":
            values = set(entry.get("values") or [m["name"] for m in entry.get("members", [])])
            if marker <= values:
                return values
    return set()
