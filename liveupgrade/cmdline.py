"""A model of QEMU's command-line syntax, faithful enough to rewrite one.

QEMU options are ``-name`` or ``--name``, most followed by one argument. An
argument is usually a ``key=value`` list separated by commas, where ``,,``
stands for a literal comma and the first element may be an implied key
(``-device virtio-blk-pci,drive=d0``: driver=virtio-blk-pci). Since QEMU 6.0
``-object``, ``-device``, ``-blockdev``, ``-netdev`` and friends also take a
JSON object. The engine reads the source's command line, changes a few
values (paths, machine type, ``-incoming``) and starts the destination with
the result; everything it does not change must come out byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

# Options that take no argument (from qemu-options.hx; old spellings kept,
# since command lines written for old QEMUs still carry them).
FLAG_OPTIONS = frozenset({
    "S", "s", "daemonize", "nodefaults", "no-user-config", "nographic", "no-reboot",
    "no-shutdown", "no-hpet", "enable-kvm", "snapshot", "full-screen", "no-acpi",
    "no-fd-bootchk", "only-migratable", "win2k-hack", "semihosting", "no-quit",
    "alt-grab", "ctrl-grab", "preconfig", "enable-fips", "usb", "no-frame",
    "rtc-td-hack", "localtime", "no-kvm", "no-kvm-irqchip", "no-kvm-pit",
    "no-kvm-pit-reinjection", "enable-nesting", "xen-attach", "curses", "portrait",
    "old-param", "singlestep", "help", "version", "h", "M?",
})

# Options whose argument has an implied first key, and that key's name.
IMPLIED_KEYS = {
    "machine": "type", "M": "type", "device": "driver", "object": "qom-type",
    "netdev": "type", "chardev": "backend", "audiodev": "driver", "accel": "accel",
    "cpu": "model", "m": "size", "smp": "cpus", "display": "type", "numa": "type",
    "vnc": "vnc", "incoming": "uri", "boot": "order", "tpmdev": "type", "nic": "type",
    "net": "type", "spice": None, "drive": None, "blockdev": None, "global": None,
    "rtc": None, "mon": None, "sandbox": "enable", "msg": None, "overcommit": None,
    "compat": None, "fsdev": "fsdriver", "virtfs": "fsdriver", "iscsi": None,
    "smbios": "type", "fw_cfg": None, "name": "guest", "uuid": None,
}

JSON_CAPABLE = frozenset({"object", "device", "blockdev", "netdev", "audiodev",
                          "compat", "display", "machine", "chardev"})


class CommandLineError(ValueError):
    """The argv cannot be understood as a QEMU command line."""


def split_keyvals(text: str) -> list[str]:
    """Split on single commas; ``,,`` is an escaped comma inside an element."""
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def escape(value: str) -> str:
    return value.replace(",", ",,")


@dataclass
class KeyVals:
    """An ordered ``key=value`` list; an element without ``=`` keeps key None.

    Order and duplicates are kept: QEMU gives some keys meaning by position
    (the implied first key) and a few allow repeats.
    """

    items: list[tuple[str | None, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> KeyVals:
        items: list[tuple[str | None, str]] = []
        for part in split_keyvals(text):
            key, sep, value = part.partition("=")
            items.append((key, value) if sep else (None, part))
        return cls(items)

    def render(self) -> str:
        return ",".join(escape(v) if k is None else f"{k}={escape(v)}" for k, v in self.items)

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.items:
            if k == key:
                return v
        return default

    @property
    def implied(self) -> str | None:
        """The first element when it has no key (``pc`` in ``pc,accel=tcg``)."""
        return self.items[0][1] if self.items and self.items[0][0] is None else None

    def set(self, key: str, value: str) -> None:
        for i, (k, _) in enumerate(self.items):
            if k == key:
                self.items[i] = (key, value)
                return
        self.items.append((key, value))

    def remove(self, key: str) -> None:
        self.items = [(k, v) for k, v in self.items if k != key]


@dataclass
class Option:
    """One option and its raw argument (None for a flag, or a positional arg)."""

    name: str | None  # None: a positional argument (a disk image)
    value: str | None = None
    spelling: str = "-"  # "-" or "--", kept for a faithful round trip

    @property
    def is_json(self) -> bool:
        return self.value is not None and self.value.lstrip().startswith("{")

    def json(self) -> dict[str, object]:
        assert self.value is not None
        try:
            data = json.loads(self.value)
        except json.JSONDecodeError as e:
            raise CommandLineError(f"-{self.name}: invalid JSON: {e}") from e
        if not isinstance(data, dict):
            raise CommandLineError(f"-{self.name}: JSON argument must be an object")
        return data

    def keyvals(self) -> KeyVals:
        assert self.value is not None and not self.is_json
        return KeyVals.parse(self.value)

    def prop(self, key: str) -> str | None:
        """A property of the argument, whether written as JSON or key=value.

        The implied first key is found under its name (``driver`` for -device).
        """
        if self.value is None:
            return None
        if self.is_json:
            value = self.json().get(key)
            return None if value is None else _json_scalar(value)
        kv = self.keyvals()
        found = kv.get(key)
        if found is None and IMPLIED_KEYS.get(self.name or "") == key:
            found = kv.implied
        return found

    def set_prop(self, key: str, value: str) -> None:
        """Change one property, keeping everything else as written."""
        if self.is_json:
            data = self.json()
            old = data.get(key)
            data[key] = _typed_like(old, value)
            self.value = json.dumps(data, separators=(",", ":"))
            return
        kv = self.keyvals()
        if kv.get(key) is None and IMPLIED_KEYS.get(self.name or "") == key and kv.implied:
            kv.items[0] = (None, value)
        else:
            kv.set(key, value)
        self.value = kv.render()

    def remove_prop(self, key: str) -> None:
        if self.is_json:
            data = self.json()
            data.pop(key, None)
            self.value = json.dumps(data, separators=(",", ":"))
        else:
            kv = self.keyvals()
            kv.remove(key)
            self.value = kv.render()

    def argv(self) -> list[str]:
        if self.name is None:
            return [self.value or ""]
        head = f"{self.spelling}{self.name}"
        return [head] if self.value is None else [head, self.value]


def _json_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return value if isinstance(value, str) else json.dumps(value)


def _typed_like(old: object, value: str) -> object:
    if isinstance(old, bool):
        return value in ("on", "true", "yes")
    if isinstance(old, int):
        return int(value)
    return value


@dataclass
class CommandLine:
    """A parsed QEMU argv: the binary and its options, in order."""

    binary: str
    options: list[Option]

    @classmethod
    def parse(cls, argv: list[str]) -> CommandLine:
        if not argv:
            raise CommandLineError("empty command line")
        options: list[Option] = []
        i = 1
        while i < len(argv):
            arg = argv[i]
            if arg.startswith("-") and len(arg) > 1:
                spelling = "--" if arg.startswith("--") else "-"
                name = arg[len(spelling):]
                if name in FLAG_OPTIONS:
                    options.append(Option(name, None, spelling))
                    i += 1
                    continue
                if i + 1 >= len(argv):
                    raise CommandLineError(f"option {arg} needs an argument")
                options.append(Option(name, argv[i + 1], spelling))
                i += 2
            else:
                options.append(Option(None, arg))
                i += 1
        return cls(argv[0], options)

    def argv(self) -> list[str]:
        out = [self.binary]
        for opt in self.options:
            out += opt.argv()
        return out

    def find(self, name: str) -> Iterator[Option]:
        """Options by name; -M and -machine are one option to QEMU."""
        names = {"machine", "M"} if name in ("machine", "M") else {name}
        return (o for o in self.options if o.name in names)

    def first(self, name: str) -> Option | None:
        return next(self.find(name), None)

    def has(self, name: str) -> bool:
        return self.first(name) is not None

    def remove(self, name: str) -> None:
        names = {"machine", "M"} if name in ("machine", "M") else {name}
        self.options = [o for o in self.options if o.name not in names]

    def add(self, name: str, value: str | None = None) -> Option:
        opt = Option(name, value)
        self.options.append(opt)
        return opt

    def by_id(self, name: str, ident: str) -> Option | None:
        """The -chardev/-object/-device/... whose id is `ident`."""
        for opt in self.find(name):
            if opt.prop("id") == ident or opt.prop("node-name") == ident:
                return opt
        return None

    def machine_prop(self, key: str) -> str | None:
        """A -machine property; later -machine options override earlier ones."""
        found = None
        for opt in self.find("machine"):
            value = opt.prop(key)
            if value is not None:
                found = value
        return found
