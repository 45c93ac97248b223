"""Exceptions that name the cause and the fix.

Every error the engine raises to a caller is a LiveUpgradeError: `str()` is
the cause, `.fix` what an operator should do, `.exit_code` the CLI's exit
status (2 for bad usage, 1 for a refusal or a failed upgrade). Root causes
stay attached as ``__cause__``.
"""

from __future__ import annotations


class LiveUpgradeError(Exception):
    exit_code = 1

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix

    def describe(self) -> str:
        return f"{self}\n  fix: {self.fix}" if self.fix else str(self)


class UsageError(LiveUpgradeError):
    """The caller asked for something that cannot mean anything (exit 2)."""

    exit_code = 2


class SourceNotFound(UsageError):
    """No QEMU process matches the PID, socket path or name given."""


class NotQemu(UsageError):
    """The process given is not a QEMU system emulator."""


class TargetBinaryError(UsageError):
    """The --to binary is missing, not executable, or not a matching QEMU."""


class MonitorError(LiveUpgradeError):
    """A QMP monitor could not be reached or used."""


class MonitorBusy(MonitorError):
    """Another client holds the monitor (QEMU serves one client per socket)."""


class Refused(LiveUpgradeError):
    """A preflight check failed; nothing was changed."""


class DestinationFailed(LiveUpgradeError):
    """The destination QEMU did not start or did not accept the migration."""


class TransferFailed(LiveUpgradeError):
    """The migration failed, timed out or was cancelled; the source runs on."""


class SwitchoverFailed(LiveUpgradeError):
    """A failure after the point of no return; the message says where the guest runs."""
