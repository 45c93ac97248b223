"""QMP connections with timeouts and errors an operator can act on."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from liveupgrade.errors import MonitorBusy, MonitorError

CONNECT_TIMEOUT = 3.0


class Monitor(Protocol):
    """What the engine needs of a source's monitor: a QMPClient, or a VM manager's
    pass-through (libvirt's qemuMonitorCommand) when the manager owns the socket."""

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                      oob: bool = False) -> object: ...

    async def disconnect(self) -> None: ...


async def connect(path: Path, name: str, timeout: float = CONNECT_TIMEOUT) -> QMPClient:
    """Open a QMP session, telling "nobody listens" from "someone else is connected".

    A QEMU monitor socket accepts one client: a second connect() is queued by
    the kernel and QEMU never sends it a greeting, so a timeout means busy.
    """
    client = QMPClient(name)
    try:
        await asyncio.wait_for(client.connect(str(path)), timeout)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await client.disconnect()
        raise MonitorBusy(
            f"the QMP monitor at {path} did not greet us within {timeout:.0f} s: "
            "another client is connected to it (QEMU serves one client per monitor socket)",
            "disconnect the other client (a management tool or qmp-shell), or give QEMU a "
            "second monitor, e.g. -qmp unix:/run/vm-upgrade.sock,server=on,wait=off",
        ) from None
    except ConnectError as e:
        root = e.exc
        if isinstance(root, FileNotFoundError) or getattr(root, "errno", None) == errno.ENOENT:
            raise MonitorError(f"no QMP socket at {path}",
                               "check the path, or that the VM is running") from e
        if isinstance(root, ConnectionRefusedError):
            raise _NotListening(f"nothing listens on the QMP socket {path} (stale socket file)",
                               "the QEMU that made it has exited; give a running VM") from e
        if isinstance(root, PermissionError):
            raise MonitorError(f"permission denied opening {path}",
                               "run as the VM's owner or as root") from e
        raise MonitorError(f"cannot open the QMP monitor at {path}: {root}") from e
    return client


class _NotListening(MonitorError):
    """The socket file exists but nothing accepts on it (yet, or any more)."""


async def connect_new(path: Path, name: str, within: float = 5.0) -> QMPClient:
    """Connect to a QEMU we just started.

    QEMU creates the socket file (bind) a moment before it listens, so a
    refused connection is retried for `within` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await connect(path, name)
        except _NotListening:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def session(path: Path, name: str, new: bool = False) -> AsyncIterator[QMPClient]:
    client = await (connect_new(path, name) if new else connect(path, name))
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def execute(client: Monitor, cmd: str, args: dict[str, Any] | None = None,
                  what: str = "") -> Any:
    """Run a QMP command. Every failure becomes a MonitorError naming its cause:
    QEMU's refusal quoted, or the connection lost (ExecInterruptedError: usually
    the QEMU died mid-command), or a client that is no longer connected (StateError)."""
    where = f" on {what}" if what else ""
    try:
        return await client.execute(cmd, args)
    except ExecuteError as e:
        raise MonitorError(f"QEMU refused {cmd}{where}: {e}") from e
    except QMPError as e:
        raise MonitorError(f"the QMP connection{where} was lost during {cmd} "
                           f"({type(e).__name__}: {e}): the QEMU process probably exited",
                           "see the QEMU's log for why it stopped") from e
    except (OSError, EOFError) as e:
        raise MonitorError(f"the QMP connection{where} failed during {cmd}: {e}") from e
