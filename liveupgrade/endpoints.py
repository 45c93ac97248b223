"""What in a QEMU command line is a path the process holds, and which one is QMP.

A destination started from the source's command line must not fight the
source for these: listening sockets and the pidfile are given private paths
on the destination and moved into place once the source has exited.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from liveupgrade.cmdline import CommandLine, KeyVals, Option

# Options whose argument is a character-device spec such as "unix:PATH,server".
CHARDEV_SPEC_OPTIONS = frozenset({"qmp", "qmp-pretty", "monitor", "serial", "parallel",
                                  "virtioconsole", "debugcon"})
TRUE_WORDS = frozenset({"on", "yes", "true", "y"})
# The monitor the engine adds to every destination, in a run folder removed after
# the upgrade: a later upgrade neither uses nor keeps it.
ENGINE_MONITOR_ID = "liveupgrade-qmp"


def kv_flag(kv: KeyVals, key: str, negation: str | None = None) -> bool | None:
    """A boolean property written as key=on, as a bare word, or as its negation word."""
    value = kv.get(key)
    if value is not None:
        return value in TRUE_WORDS
    for k, v in kv.items[1:]:
        if k is None and v == key:
            return True
        if k is None and negation and v == negation:
            return False
    return None


@dataclass
class HeldPath:
    """A path the source process holds exclusively, and where it is written."""

    option: Option
    path: Path
    kind: str  # "monitor", "chardev-server", "pidfile", "vnc"
    is_qmp: bool = False
    chardev_id: str | None = None


PRIVATE_DIR_PREFIX = ".liveupgrade-"


def private_sibling(original: Path, token: str) -> Path:
    """A private path beside the original: same filesystem, so a rename is atomic."""
    return original.parent / f"{PRIVATE_DIR_PREFIX}{token}" / original.name


def original_path(path: Path) -> Path:
    """Undo private_sibling: a QEMU an earlier upgrade started still names the
    private path in its argv, but the socket has since been moved into place."""
    if path.parent.name.startswith(PRIVATE_DIR_PREFIX):
        return path.parent.parent / path.name
    return path


def spec_unix_path(value: str) -> str | None:
    """The path of a "unix:PATH,..." character-device spec (-qmp, -serial, ...), or None."""
    head = KeyVals.parse(value).implied or ""
    return head[len("unix:"):] if head.startswith("unix:") else None


def control_chardevs(cmd: CommandLine) -> set[str | None]:
    """Ids of the chardevs that serve QMP (-mon mode=control, or -object monitor-qmp as
    QEMU 11.1 prefers), not the engine's own."""
    mons = {o.prop("chardev") for o in cmd.find("mon")
            if (o.prop("mode") or "readline") == "control"}
    objects = {o.prop("chardev") for o in cmd.find("object")
               if o.prop("qom-type") == "monitor-qmp"}
    return (mons | objects) - {ENGINE_MONITOR_ID}


def is_socket_server(opt: Option) -> bool:
    """A -chardev socket that listens (server=on, a bare `server`, or JSON true)."""
    if opt.name != "chardev" or opt.prop("backend") != "socket":
        return False
    server = opt.prop("server")
    if server is not None:
        return server in TRUE_WORDS
    return not opt.is_json and bool(kv_flag(opt.keyvals(), "server"))


def held_paths(cmd: CommandLine) -> list[HeldPath]:
    """Every listening unix socket, and the pidfile, in the command line."""
    qmp_chardevs = control_chardevs(cmd)
    found: list[HeldPath] = []
    for opt in cmd.options:
        if opt.value is None:
            continue
        if opt.name in CHARDEV_SPEC_OPTIONS and not opt.is_json:
            kv = opt.keyvals()
            path = spec_unix_path(opt.value)
            if path and kv_flag(kv, "server"):
                found.append(HeldPath(opt, original_path(Path(path)), "monitor",
                                      is_qmp=opt.name in ("qmp", "qmp-pretty")))
        elif is_socket_server(opt):
            path = opt.prop("path")
            if path and opt.prop("id") != ENGINE_MONITOR_ID:
                ident = opt.prop("id")
                found.append(HeldPath(opt, original_path(Path(path)), "chardev-server",
                                      is_qmp=ident in qmp_chardevs, chardev_id=ident))
        elif opt.name == "pidfile":
            found.append(HeldPath(opt, original_path(Path(opt.value)), "pidfile"))
        elif opt.name == "vnc" and opt.value.startswith("unix:"):
            raw = Path(KeyVals.parse(opt.value[5:]).items[0][1])
            found.append(HeldPath(opt, original_path(raw), "vnc"))
    return found


def qmp_paths(cmd: CommandLine) -> list[Path]:
    return [h.path for h in held_paths(cmd) if h.is_qmp]


def without_waiting(kv: KeyVals) -> str:
    """The spec with any wait/nowait spelling replaced by wait=off."""
    kv.items = [(k, v) for k, v in kv.items if not (k is None and v in ("wait", "nowait"))]
    kv.set("wait", "off")
    return kv.render()


def relocate(held: HeldPath, new_path: Path) -> None:
    """Point the option at new_path and make a server socket not wait for a client."""
    opt = held.option
    assert opt.value is not None
    if held.kind == "pidfile":
        opt.value = str(new_path)
    elif held.kind == "vnc":
        kv = KeyVals.parse(opt.value[5:])
        kv.items[0] = (None, str(new_path))
        opt.value = "unix:" + kv.render()
    elif held.kind == "monitor":
        kv = opt.keyvals()
        kv.items[0] = (None, f"unix:{new_path}")
        opt.value = without_waiting(kv)
    elif opt.is_json:
        data = opt.json()
        data.update(path=str(new_path), wait=False)  # JSON wants a boolean, not "off"
        opt.value = json.dumps(data, separators=(",", ":"))
    else:
        opt.set_prop("path", str(new_path))
        opt.value = without_waiting(opt.keyvals())
